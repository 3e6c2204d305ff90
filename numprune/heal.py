"""Block-local healing: after pruning, fit each pruned layer to the dense layer's output, one layer at a time.

The least-squares compensation refits two matrices per layer from the dense model's statistics; every
other kept weight stays as it was, and each layer's error feeds the next. Healing visits the layers in
order: the pruned layer gets the pruned model's own stream (so it also corrects what the layers above
got wrong) and its kept weights (all, or the norms and biases only) are fitted with Adam, the learning
rate decaying along a cosine, to the dense layer's output on the dense stream. Alive at any time: the
two streams of calibration activations (dense and pruned), plus the dense sub-blocks' outputs with the
``relative`` loss, and float32 working copies of the two layers on the stream's device.

A layer keeps its fitted weights only if its calibration loss went down, so healing never raises it.

The per-layer loop (``heal_layers``) runs over two layer sources (numprune.sources): the loaded models
here, or the layers of two folders read from disk one at a time (numprune.stream's ``heal_streaming``),
where each healed layer is written to the output as soon as it is done.

The ``distill`` mode trains the whole pruned model to the dense model's next-token distribution instead
(numprune.distill); ``local+distill`` fits the layers first, then distils. Without a mode, healing distils where
the training fits in the free memory and is block-local otherwise (``decide_mode``), and always block-local where
the layers are read from disk (``streamed_options``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from numprune.adapters import Adapter
from numprune.calibrate import LayerStream, shared_map
from numprune.distill import DistillRecord, distill, memory_needed
from numprune.errors import NumpruneError
from numprune.extras import need
from numprune.pipeline import check_tokens
from numprune.precision import check_device, free_memory, model_device
from numprune.recipe import HealOptions, heal_fields
from numprune.sources import InMemory, LayerSource

ENERGY_FLOOR = 1e-12  # a dead sub-block's output energy, so that the relative loss stays finite


@dataclass(frozen=True)
class LayerHealing:
    """One layer's calibration loss before and after its fit, and whether the fitted weights were kept."""

    before: float
    after: float
    kept: bool
    seconds: float


@dataclass
class HealRecord:
    """What ``heal`` did: its options, each layer's losses (block-local), the distillation's record, the calibration
    tokens and its time."""

    options: HealOptions
    layers: list[LayerHealing]
    tokens: int
    seconds: float
    distillation: DistillRecord | None = None

    def to_json(self) -> dict:
        return {"options": asdict(self.options), "mode": self.options.mode, "tokens": self.tokens,
                "seconds": round(self.seconds, 3),
                "layers": [{**asdict(layer), "seconds": round(layer.seconds, 3)} for layer in self.layers],
                "distillation": self.distillation.to_json() if self.distillation is not None else None}


def heal(dense: nn.Module, pruned: nn.Module, tokens: torch.Tensor | None, /, *, progress: bool = True,
         device: torch.device | str | None = None, **options) -> tuple[nn.Module, HealRecord]:
    """Heal ``pruned`` (in place; it is returned) toward ``dense`` on calibration ``tokens``: layer by layer, by
    distillation, or both, as ``options``' mode says.

    ``options`` are HealOptions' fields (``tokens=`` among them is distillation's budget; the calibration tokens
    are the third argument, by position); without a mode, ``decide_mode`` picks one. ``dense`` is left untouched.
    The layer passes, the fits and the distillation run on ``device`` (default: the dense model's own) in float32.
    """
    opts = HealOptions.checked(**options)
    if dense is pruned:
        raise NumpruneError("the dense and the pruned model are the same model; heal a pruned copy")
    teacher, student = InMemory(dense), InMemory(pruned)
    check_healable(teacher, student, tokens)
    where = check_device(device) or model_device(dense)
    opts = decide_mode(opts, memory_needed(student.adapter, opts, tokens.shape[1]), free_memory(where), tokens.numel())
    return pruned, run_healing(teacher, student, tokens, opts, where, progress)


def run_healing(dense: InMemory, pruned: InMemory, tokens: torch.Tensor, opts: HealOptions, where: torch.device,
                progress: bool) -> HealRecord:
    """Heal the loaded ``pruned`` model toward ``dense`` in ``opts``' decided mode (checked: ``heal``); its record.

    Whatever torch's default device is (a GPU user's set_default_device), what healing allocates without a
    device (the optimizer's step counts, LoRA's matrices) lands on ``where``."""
    start = time.perf_counter()
    with torch.device(where):
        layers = heal_layers(dense, pruned, tokens, where, opts, progress) if opts.mode != "distill" else []
        distilled = (distill(dense.adapter.model, pruned.adapter.model, tokens, opts, where, progress)
                     if "distill" in opts.mode else None)
    return HealRecord(opts, layers, int(tokens.numel()), time.perf_counter() - start, distilled)


def decide_mode(opts: HealOptions, needed: int, free: int, calibration_tokens: int) -> HealOptions:
    """``opts`` decided (HealOptions.decided, on ``calibration_tokens``) before the long work: without a mode,
    distillation where its training (``needed`` bytes, numprune.distill.memory_needed) fits in the ``free`` memory,
    else block-local healing, which holds one layer at a time; a distilling mode that does not fit is refused."""
    fits = needed <= free
    decided = opts.decided("distill" if fits else "local", calibration_tokens)
    if "distill" in decided.mode and not fits:
        raise NumpruneError(f"distillation trains the whole pruned model, which needs about {needed / 2**30:.1f} GiB, "
                            f"and {free / 2**30:.1f} GiB is free: heal with the local mode, which holds one layer "
                            "at a time")
    if decided.lora_rank:
        need("peft", "distillation with LoRA")
    return decided


def streamed_options(opts: HealOptions) -> HealOptions:
    """``opts`` decided for layers read from disk one at a time: block-local unless they ask to distil, which trains
    the whole model at once and is refused."""
    if opts.mode is not None and "distill" in opts.mode:
        raise NumpruneError(f"the healing mode {opts.mode} distils, which trains the whole pruned model at once; a "
                            "streamed run holds one layer at a time: heal with the local mode, or in memory")
    return opts.decided("local")


def check_healable(dense: LayerSource, pruned: LayerSource, tokens) -> None:
    """The calibration tokens fit the dense model and ``pruned`` was pruned from it (only the embeddings are read)."""
    if tokens is None:
        raise NumpruneError("healing needs calibration tokens")
    check_tokens(dense.adapter, tokens)
    with dense.inputs(), pruned.inputs():
        _check_pair(dense.adapter, pruned.adapter)


def healed_report(report: dict, record: HealRecord, **extra) -> dict:
    """A saved pruned model's ``report`` once healed: its recipe says heal=True with the options, its ``healing``
    is ``record`` with ``extra`` (what the calibration was, which dense model)."""
    report["options"].update(heal=True, **heal_fields(record.options))
    report["healing"] = {**record.to_json(), **extra}
    return report


def heal_layers(dense: LayerSource, pruned: LayerSource, tokens: torch.Tensor, where: torch.device,
                opts: HealOptions, progress: bool) -> list[LayerHealing]:
    """Block-local healing: each pruned layer in order fitted to the dense layer's output; what each did.

    Each source holds one layer at a time: the dense layer only while its outputs are computed, the pruned one
    while it is fitted; ``pruned.healed`` gets each layer's fitted weights (None where the fit is not kept)."""
    teacher, student = dense.adapter, pruned.adapter
    with dense.inputs():
        dense_stream = LayerStream(teacher.model, teacher, tokens, opts.batch, where, torch.float32)
    with pruned.inputs():
        pruned_stream = LayerStream(student.model, student, tokens, opts.batch, where, torch.float32)
    generator = torch.Generator().manual_seed(opts.seed)
    parts = opts.loss == "relative"
    layers = []
    for i in range(teacher.num_layers()):
        layer_start = time.perf_counter()
        with dense.layer(i) as dense_layer:
            targets = _Block(teacher, dense_layer, where, parts).outputs(dense_stream)
        dense_stream.advance([out for out, _ in targets])
        with pruned.layer(i) as layer:
            fit = _Fit(student, layer, where, parts, opts, targets, pruned_stream)
            before = fit.loss()
            bar = tqdm(total=opts.epochs * len(targets), desc=f"healing layer {i}", unit="step",
                       disable=not progress)
            with bar:
                fit.train(generator, bar, before)
                after, outputs = fit.loss(keep_outputs=True)
                kept = after < before
                bar.set_postfix_str(f"loss {before:.4g} -> {after:.4g}" + ("" if kept else " (not kept)"))
            if not kept:
                outputs = [out for out, _ in _Block(student, layer, where, False).outputs(pruned_stream)]
            pruned.healed(i, layer, fit.block.module.state_dict() if kept else None)
        pruned_stream.advance(outputs)
        layers.append(LayerHealing(before, min(after, before), kept, time.perf_counter() - layer_start))
    return layers


def _check_pair(dense: Adapter, pruned: Adapter) -> None:
    """``pruned`` was pruned from ``dense``: same layers, same embeddings, no layer wider than the dense one's (the
    embeddings must be present: in memory, or inside both streamed sources' ``inputs``)."""
    if pruned.num_layers() != dense.num_layers():
        raise NumpruneError(f"the pruned model has {pruned.num_layers()} layers and the dense model "
                            f"{dense.num_layers()}: it was not pruned from this dense model")
    embeddings = [a.model.get_input_embeddings().weight for a in (dense, pruned)]
    if embeddings[0].shape != embeddings[1].shape or not torch.equal(embeddings[0].detach().cpu(),
                                                                      embeddings[1].detach().cpu().to(embeddings[0].dtype)):
        raise NumpruneError(f"the pruned model's embeddings ({tuple(embeddings[1].shape)}) differ from the dense "
                            f"model's ({tuple(embeddings[0].shape)}): it was not pruned from this dense model")
    for i in range(dense.num_layers()):
        heads, width = pruned.attention_layout(i).num_heads, pruned.mlp_width(i)
        if heads > dense.attention_layout(i).num_heads or width > dense.mlp_width(i):
            raise NumpruneError(f"layer {i} of the pruned model ({heads} heads, {width} channels) is wider than the "
                                f"dense model's: it was not pruned from this dense model")


def _mean_square(tensors: list[torch.Tensor]) -> float:
    return sum(float(t.double().pow(2).sum()) for t in tensors) / sum(t.numel() for t in tensors)


class _Block:
    """A float32 working copy of a decoder layer on ``device``; with ``parts``, each forward also gives the outputs
    of its two output projections (the attention and MLP sub-blocks' contributions)."""

    def __init__(self, adapter: Adapter, layer: nn.Module, device: torch.device, parts: bool):
        self.module = copy.deepcopy(layer).to(device, torch.float32).eval()
        self.captured = captured = []
        if parts:  # the hooks hold the list, not the block: no reference cycle keeps a layer's copy alive until gc
            for projection in (adapter.attention_output(self.module), adapter.mlp_output(self.module)):
                projection.register_forward_hook(lambda _m, _args, out: captured.append(out))

    def __call__(self, hidden: torch.Tensor, args, kwargs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        self.captured.clear()
        out = self.module(hidden, *args, **kwargs)
        return (out[0] if isinstance(out, tuple) else out), tuple(self.captured)

    def outputs(self, stream: LayerStream) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """The layer's output (and sub-block outputs) for every batch of ``stream``, without gradients."""
        with torch.inference_mode():
            return [self(hidden, *arguments) for hidden, arguments in zip(stream.hidden, stream.arguments[stream.position])]


class _Fit:
    """One pruned layer fitted to the dense layer's ``targets`` on the pruned stream's batches."""

    def __init__(self, adapter: Adapter, layer: nn.Module, device: torch.device, parts: bool, opts: HealOptions,
                 targets: list, stream: LayerStream):
        self.block = _Block(adapter, layer, device, parts)
        self.opts, self.targets, self.stream = opts, targets, stream
        memo = {}
        # clones: the stream records under inference mode, and autograd cannot save inference tensors for backward
        self.arguments = [shared_map(arguments, torch.Tensor.clone, memo)
                          for arguments in stream.arguments[stream.position]]
        # each sub-block's dense output energy per element, over all the calibration tokens (relative loss)
        self.energy = [max(_mean_square([parts[k] for _, parts in targets]), ENERGY_FLOOR)
                       for k in range(len(targets[0][1]))]

    def batch_loss(self, b: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, parts = self.block(hidden, *self.arguments[b])
        target, target_parts = self.targets[b]
        if self.opts.loss == "mse":
            return (out - target).pow(2).mean(), out
        return sum((p - t).pow(2).mean() / e for p, t, e in zip(parts, target_parts, self.energy)), out

    def loss(self, keep_outputs: bool = False):
        """The layer's calibration loss over every batch (weighted by tokens); with ``keep_outputs``, also its outputs."""
        total, weight, outputs = 0.0, 0, []
        with torch.inference_mode():
            for b, hidden in enumerate(self.stream.hidden):
                loss, out = self.batch_loss(b, hidden)
                total += float(loss) * hidden.shape[0] * hidden.shape[1]
                weight += hidden.shape[0] * hidden.shape[1]
                if keep_outputs:
                    outputs.append(out)
        return (total / weight, outputs) if keep_outputs else total / weight

    def train(self, generator: torch.Generator, bar: tqdm, before: float) -> None:
        module = self.block.module
        norms = {id(p) for m in module.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)}
        for name, p in module.named_parameters():
            p.requires_grad_(self.opts.params == "all" or id(p) in norms or name.endswith("bias"))
        trained = [p for p in module.parameters() if p.requires_grad]
        if not trained:
            raise NumpruneError(f"this layer has no {self.opts.params} parameters to heal")
        optimizer = torch.optim.Adam(trained, lr=self.opts.lr)
        steps = self.opts.epochs * len(self.targets)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        for _ in range(self.opts.epochs):
            for b in torch.randperm(len(self.targets), generator=generator, device="cpu").tolist():
                loss, _ = self.batch_loss(b, self.stream.hidden[b].clone())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix_str(f"loss {before:.4g} -> {float(loss.detach()):.4g}", refresh=False)
        for p in module.parameters():
            p.requires_grad_(False)
