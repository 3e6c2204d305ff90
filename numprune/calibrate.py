"""Layer-by-layer calibration: stream tokens through one decoder layer at a time.

One capture pass of the model records, for every batch, the inputs of the first decoder layer and
the other arguments the model's forward gives each layer (attention mask, rotary table, position
ids): a sliding-window layer gets its sliding mask, a Gemma 3 full-attention layer its own rotary
table. During that pass the layers are not run (their forwards are swapped for recorders that
touch no weight), and tensors the model hands several layers are kept once. From then on only one
layer's activations are alive, and each layer's statistics go to a temporary folder as soon as they
are complete (StatsStore), so memory does not grow with the number of layers. While a layer runs,
forward hooks on its two output projections accumulate what every
criterion and the compensation need: the Gram matrix X^T X and the sum of the inputs, in float64
(each batch's product is formed in float32 over a few thousand tokens, then added in float64, so
sums over hundreds of thousands of tokens keep their precision).

Where the layer pass runs is the stream's choice (``device``, ``dtype``): each layer is copied there
for its pass while the weights themselves stay where they are (CPU memory or disk), and the
statistics accumulate on that device in float64, whatever the compute precision. Under
torch.distributed each process streams its share of the samples and ``reduce`` sums the
statistics across processes before anyone reads them.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from numprune.adapters import Adapter
from numprune.adapters.base import projection_weight
from numprune.errors import NumpruneError
from numprune.precision import free_memory

GRAM_BLOCK = 2048  # rows of X^T X formed at once (float32, then float64): bounds the temporaries to 2048 x D


@dataclass
class InputStats:
    """Sufficient statistics of the inputs of one linear layer."""

    gram: torch.Tensor  # float64 [D, D]: sum over tokens of x x^T
    total: torch.Tensor  # float64 [D]: sum over tokens of x
    count: int = 0

    @classmethod
    def empty(cls, dim: int, device: torch.device | str | None = None) -> InputStats:
        return cls(torch.zeros(dim, dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dtype=torch.float64, device=device))

    def to(self, device: torch.device | str) -> InputStats:
        return InputStats(self.gram.to(device), self.total.to(device), self.count)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        for start in range(0, x.shape[1], GRAM_BLOCK):  # a block of rows at a time: no [D, D] temporaries
            self.gram[start:start + GRAM_BLOCK] += (x[:, start:start + GRAM_BLOCK].T @ x).double()
        self.total += x.sum(0).double()
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """E[x x^T]: the Gram matrix normalised by the token count."""
        return self.gram / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Per-channel variance over tokens."""
        return (self.gram.diagonal() / self.count - self.mean**2).clamp_min(0)


@dataclass
class LayerStats:
    attention: InputStats  # inputs of the attention output projection: the heads' channels
    mlp: InputStats  # inputs of the MLP output projection: the intermediate channels

    def to(self, device: torch.device | str) -> LayerStats:
        return LayerStats(self.attention.to(device), self.mlp.to(device))


class StatsStore(Sequence):
    """Every layer's LayerStats, on disk (safetensors) until asked for, one layer loaded at a time."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="numprune-stats-")  # removed with this object
        self._count = 0

    def _path(self, index: int) -> Path:
        return Path(self._folder.name) / f"layer{index}.safetensors"

    def append(self, stats: LayerStats) -> None:
        tensors = {f"{part}.{field}": getattr(getattr(stats, part), field)
                   for part in ("attention", "mlp") for field in ("gram", "total")}
        counts = {f"{part}.count": str(getattr(stats, part).count) for part in ("attention", "mlp")}
        save_file(tensors, self._path(self._count), metadata=counts)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> LayerStats:
        if not -self._count <= index < self._count:
            raise IndexError(index)
        with safe_open(self._path(index % self._count), "pt") as f:
            counts = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return LayerStats(*(InputStats(tensors[f"{p}.gram"], tensors[f"{p}.total"], int(counts[f"{p}.count"]))
                            for p in ("attention", "mlp")))


class LayerStream:
    """Calibration activations entering one decoder layer, advanced layer by layer.

    The first layer's inputs are computed where the input embeddings are, then moved to ``device``
    (default: there too) in ``dtype`` (default: the layers' own), with every layer's other arguments.
    ``reduce`` sums collected statistics across processes (see numprune.distributed).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, tokens: torch.Tensor, batch_size: int = 8,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 reduce: Callable[[LayerStats], None] | None = None):
        self.adapter = adapter
        source = model.get_input_embeddings().weight.device
        self.device = torch.device(device) if device is not None else source
        self.dtype = dtype
        self.reduce = reduce
        self.position = 0  # the layer whose inputs ``hidden`` are
        layers = adapter.layers()
        hidden, arguments = [], []  # per batch: the first layer's hidden states; every layer's (args, kwargs)
        batches = tokens.split(batch_size)
        with _recording(layers, hidden, arguments), torch.inference_mode():
            for batch in batches:
                try:
                    model(batch.to(source), use_cache=False)
                except _Captured:
                    if len(hidden) == 1:  # the first batch shows what every batch keeps: check before the rest
                        outputs = hidden[0].numel() * (dtype or hidden[0].dtype).itemsize  # a layer's, made anew
                        per_batch = _kept_bytes((hidden, arguments), self.device, dtype) + outputs
                        _check_memory(self.device, len(batches) * per_batch, tokens.numel())
                    continue
                raise RuntimeError("the model's forward never reached its last decoder layer")
        memo = {}  # by identity: a mask or rotary table the model gives several layers is moved once, and kept once
        self.hidden = [_moved(h, self.device, dtype, memo) for h in hidden]
        # self.arguments[layer][batch]: what the model's forward gave that layer besides its hidden states
        self.arguments = [[_moved(batch[i], self.device, dtype, memo) for batch in arguments]
                          for i in range(len(layers))]

    @property
    def tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def run(self, layer: nn.Module, *, collect: bool, advance: bool) -> LayerStats | None:
        """Run ``layer`` over every batch; collect its projection-input statistics and/or move on.

        The statistics come back on the CPU, summed over all processes when the stream has ``reduce``.
        """
        work = self._working_copy(layer)
        hooks = _StatsHooks(self.adapter, work, self.device) if collect else nullcontext()
        with hooks as stats, torch.inference_mode():
            outputs = []
            for hidden, (args, kwargs) in zip(self.hidden, self.arguments[self.position]):
                out = work(hidden, *args, **kwargs)
                if advance:
                    outputs.append(out[0] if isinstance(out, tuple) else out)
        if advance:
            self.advance(outputs)
        if stats is not None and self.reduce is not None:
            self.reduce(stats)
        return stats.to("cpu") if stats is not None else None

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """Move on to the next layer, whose inputs are ``outputs`` (one tensor per batch, from this layer)."""
        self.hidden = outputs
        self.arguments[self.position] = None  # what no later layer shares is freed
        self.position += 1

    def _working_copy(self, layer: nn.Module) -> nn.Module:
        """``layer`` itself if it already lives on the stream's device in its dtype, else a copy there."""
        weight = next(layer.parameters())
        if weight.device == self.device and self.dtype in (None, weight.dtype):
            return layer
        return copy.deepcopy(layer).to(self.device, self.dtype)


def collect_statistics(model: nn.Module, adapter: Adapter, tokens: torch.Tensor, batch_size: int = 8,
                       progress: bool = True, **stream_options) -> StatsStore:
    """Statistics of every layer's output-projection inputs on the dense model, one layer at a time.

    ``stream_options`` (device, dtype, reduce) go to LayerStream.
    """
    stream = LayerStream(model, adapter, tokens, batch_size, **stream_options)
    stats = StatsStore()
    for layer in tqdm(adapter.layers(), desc="calibrating", unit="layer", disable=not progress):
        stats.append(stream.run(layer, collect=True, advance=True))
    return stats


@contextmanager
def _recording(layers: nn.ModuleList, hidden: list, arguments: list) -> Iterator[None]:
    """While the block runs, each layer's forward is a recorder instead (it touches no weight): a forward of
    the model appends its first layer's hidden states to ``hidden`` and a list of every layer's other
    arguments ``(args, kwargs)`` to ``arguments``, passes the hidden states on unchanged, and raises
    _Captured at the last layer. The KV cache is left out (calibration runs without one)."""
    def recorder(i: int):
        def forward(*args, **kwargs):
            states = args[0] if args else kwargs.pop("hidden_states")
            if i == 0:
                hidden.append(states)
                arguments.append([])
            arguments[-1].append((args[1:], {k: v for k, v in kwargs.items() if k != "cache"}))
            if i == len(layers) - 1:
                raise _Captured
            return states
        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # a forward set on the instance (accelerate's hooks)
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def shared_map(value, convert, memo: dict):
    """``value`` (a tensor, or tuples/lists/dicts of them) with every tensor ``convert``ed.

    ``memo`` (id -> converted tensor) makes a tensor met again the same converted tensor, not another
    copy, so what the model shares between layers (a mask, a rotary table) stays shared; the tensors it
    was made from must stay alive while it is used (ids are unique only among the living).
    """
    if torch.is_tensor(value):
        if id(value) not in memo:
            memo[id(value)] = convert(value)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(shared_map(v, convert, memo) for v in value)
    if isinstance(value, dict):
        return {k: shared_map(v, convert, memo) for k, v in value.items()}
    return value


def _moved(value, device: torch.device, dtype: torch.dtype | None, memo: dict):
    """``value`` on ``device``, floating tensors in ``dtype``, shared tensors still shared (``shared_map``).
    accelerate's ``send_to_device`` would copy a shared mask once per layer and casts no dtype, hence this."""
    return shared_map(value, lambda t: t.to(device, dtype if dtype is not None and t.is_floating_point() else None),
                      memo)


def _kept_bytes(value, device: torch.device, dtype: torch.dtype | None) -> int:
    """Bytes of the distinct tensors in ``value`` once ``_moved`` to the stream: a tensor already there in its
    dtype is kept as it is (an expanded mask costs its storage), any other is copied whole."""
    distinct = []
    shared_map(value, distinct.append, {})
    def size(t: torch.Tensor) -> int:
        if t.device == device and (dtype is None or not t.is_floating_point() or t.dtype == dtype):
            return t.untyped_storage().nbytes()
        return t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())
    return sum(map(size, distinct))


def _check_memory(device: torch.device, needed: int, tokens: int) -> None:
    """Refuse a calibration whose kept activations (each window's hidden states in and out of the layer being run,
    its attention masks and rotary tables) could not fit in ``device``'s free memory, before the bulk is captured:
    an eager attention's masks, [samples, 1, seqlen, seqlen], can outweigh the hidden states many times."""
    free = free_memory(device)
    if needed > free:
        raise NumpruneError(f"calibrating on {tokens:,} tokens keeps about {needed / 2**30:.1f} GiB of activations, "
                            f"attention masks and rotary tables; {free / 2**30:.1f} GiB of memory is free on "
                            f"{device.type}")


class _Captured(Exception):
    """Stops the capture pass once the last decoder layer's arguments are recorded."""


class _StatsHooks:
    """Forward pre-hooks that feed the two output projections' inputs into LayerStats."""

    def __init__(self, adapter: Adapter, layer: nn.Module, device: torch.device):
        attn, mlp = adapter.attention_output(layer), adapter.mlp_output(layer)
        self.stats = LayerStats(*(InputStats.empty(projection_weight(m).shape[1], device) for m in (attn, mlp)))
        self.targets = [(attn, self.stats.attention), (mlp, self.stats.mlp)]
        self.handles = []

    def __enter__(self) -> LayerStats:
        for module, stats in self.targets:
            self.handles.append(module.register_forward_pre_hook(lambda _m, args, s=stats: s.add(args[0])))
        return self.stats

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

