"""Depth pruning: remove whole decoder layers, and patch the gap by least squares (ReplaceMe's idea).

One calibration pass through the dense model accumulates, for every span ``[i, i + n)`` of ``n``
consecutive layers, what choosing and patching it needs, as float64 sums over the calibration
tokens (never the activations themselves):

- the stream ``h_i`` entering the span and ``h_j`` leaving it (``j = i + n``): their mean angular
  distance (ShortGPT / ReplaceMe's score), and ShortGPT's per-layer block influence 1 - cos;
- for layer ``i - 1``, whose output is ``h_i = r + a W^T`` (``r`` the stream before its MLP, ``a``
  the inputs of its MLP output projection ``W``): ``G = a^T a``, ``C = a^T (h_j - r)`` and
  ``|h_j - r|^2``, from which the patched projection
  ``W'^T = (G + lam I)^-1 (C + lam W^T)`` (a ridge toward the original ``W``) and the error it leaves,
  ``|a W'^T - (h_j - r)|^2 = |h_j' - h_j|^2``, follow exactly.

Layer ``i - 1`` then hands the next kept layer what the span would have: the saved model has no
extra module, only a different ``W``, and fewer layers (stock config, ``num_hidden_layers`` smaller).
A span cannot start at layer 0: there is no layer before it to carry the patch, and the embedding
that precedes it maps each token on its own, while the span mixes tokens through attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from numprune.adapters import Adapter, adapter_for
from numprune.adapters.base import projection_weight
from numprune.errors import NumpruneError
from numprune.modeling.per_layer import PER_LAYER_FIELDS
from numprune.precision import free_memory, full_precision, model_device

# Families whose decoder layer adds its MLP output projection's output straight to the stream (no norm after it),
# so that a new projection weight is exactly a linear patch of the stream leaving the layer.
PATCHABLE = ("llama", "mistral", "phi3", "qwen2", "qwen3")
# the span with the least error after the patch; ShortGPT's layers, each run of consecutive ones patched; ShortGPT's
# layers, no patch
SELECTIONS = ("patched", "scattered", "shortgpt")
DEFAULT_RIDGE = 1.0  # relative to the mean diagonal of G; best on the validation texts at 3, 6 and 9 of SmolLM2's 30 layers
# (0.01 at 15), among 0.01, 0.1 and 1 (docs/results.md, depth pruning)
PER_LAYER_CONFIG_LISTS = ("layer_types", *PER_LAYER_FIELDS)  # config lists with one entry per layer


@dataclass
class DepthStats:
    """Sums over the calibration tokens for spans of ``depth`` layers (index ``i``: the span starting at layer i)."""

    depth: int
    grams: dict[int, torch.Tensor]  # i -> a^T a of layer i - 1's MLP output projection inputs
    cross: dict[int, torch.Tensor]  # i -> a^T (h_j - r)
    target_sq: dict[int, float]  # i -> |h_j - r|^2
    stream_sq: dict[int, float]  # i -> |h_j|^2
    angular: dict[int, float]  # i -> sum of arccos(cos(h_i, h_j)) / pi
    influence: list[float]  # per layer: sum of 1 - cos(h_l, h_l+1) (ShortGPT's block influence)
    count: int = 0


@dataclass
class DepthRecord:
    """What the report says of the depth step (pruning_report.json's ``depth``)."""

    selection: str
    layers_before: int
    removed_layers: list[int]
    ridge: float | None
    patched_layer: int | None  # the layer whose MLP output projection carries the (first) patch
    relative_error_before_patch: float | None  # |h_j' - h_j|^2 / |h_j|^2 on the calibration tokens, no patch
    relative_error_after_patch: float | None  # (scattered: both are means over the patched runs)
    angular_distance: float | None  # mean over calibration tokens, of the removed span
    candidates: dict[str, float]  # each candidate span's (or layer's) selection score, as "i-j" (or "l")
    patched_layers: list[int] = field(default_factory=list)  # every patched layer (scattered: one per run)
    patch_errors: list[list[float]] = field(default_factory=list)  # each patch's errors before and after it

    def to_json(self) -> dict:
        return asdict(self)


def check_depth(adapter: Adapter, depth: int) -> None:
    """Refuse, before any work, a depth this model cannot lose or a family whose layers cannot be patched (the
    recipe, numprune.recipe, has checked the depth options' values)."""
    if adapter.family not in PATCHABLE:
        raise NumpruneError(f"depth pruning supports the {', '.join(PATCHABLE)} families, not {adapter.family} "
                            "(its layers do not add the MLP output straight to the stream)")
    layers = adapter.num_layers()
    # The patched span starts at layer 1 or later, so at most L - 1 layers can go; ShortGPT keeps one layer too.
    if depth >= layers:
        raise NumpruneError(f"cannot remove {depth} of this model's {layers} layers; remove at most {layers - 1}")


def layers_for_ratio(num_layers: int, depth_ratio: float) -> int:
    """The number of layers a share of them is (rounded to the nearest, at least one)."""
    if not isinstance(depth_ratio, (int, float)) or isinstance(depth_ratio, bool) or not 0 < depth_ratio < 1:
        raise NumpruneError(f"depth ratio must be between 0 and 1 (exclusive), got {depth_ratio!r}")
    return max(1, round(depth_ratio * num_layers))


def _products(x: torch.Tensor) -> torch.Tensor:
    """Tokens as rows, in a dtype matmuls keep precision in (half precisions go to float32)."""
    x = x.reshape(-1, x.shape[-1])
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def collect_depth_stats(model: PreTrainedModel, tokens: torch.Tensor, depth: int, batch_size: int = 8,
                        progress: bool = True, starts: list[int] | None = None) -> DepthStats:
    """One pass through ``model`` over ``tokens``, accumulating ``DepthStats`` for spans of ``depth`` layers (those
    starting at ``starts`` only, if given: the patch's sums are the pass's cost)."""
    adapter = adapter_for(model)
    layers = adapter.layers()
    count_layers = len(layers)
    starts = range(1, count_layers - depth + 1) if starts is None else starts
    stats = DepthStats(depth, {}, {}, dict.fromkeys(starts, 0.0), dict.fromkeys(starts, 0.0),
                       dict.fromkeys(range(count_layers - depth + 1), 0.0), [0.0] * count_layers)
    stream: dict[int, torch.Tensor] = {}  # l -> h_l of this batch, kept while a span starting at l is open
    before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # l -> (a, r) of layer l, while a span after it is open
    mlp_io: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(store: dict, key: int, value: torch.Tensor) -> None:
        store[key] = store[key] + value.double() if key in store else value.double()

    def on_projection(l):
        def hook(module, args, out):
            mlp_io[l] = (_products(args[0]).detach(), _products(out).detach())
        return hook

    def on_input(l):
        def hook(module, args, kwargs):
            if l == 0:
                stream[0] = _products(args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def on_output(l):
        def hook(module, args, out):
            h_out, h_in = _products(_output(out)).detach(), stream[l]
            stats.influence[l] += float((1 - nn.functional.cosine_similarity(h_in, h_out, dim=-1).double()).sum())
            stream[l + 1] = h_out
            a, m = mlp_io.pop(l)
            if l + 1 in stats.target_sq:  # layer l precedes a candidate span: keep its MLP input and stream
                before[l] = (a, h_out - m)
            i = l + 1 - depth  # the span [i, l + 1) closes here
            if i >= 0:
                cos = nn.functional.cosine_similarity(stream[i], h_out, dim=-1).double().clamp(-1, 1)
                stats.angular[i] += float(torch.arccos(cos).sum() / torch.pi)
            if i in stats.target_sq:
                a, r = before.pop(i - 1)
                target = h_out - r
                add(stats.grams, i, a.T @ a)
                add(stats.cross, i, a.T @ target)
                stats.target_sq[i] += float(target.double().square().sum())
                stats.stream_sq[i] += float(h_out.double().square().sum())
            for k in [k for k in stream if k <= i]:  # no span starting there is open any more
                del stream[k]
        return hook

    handles = []
    for l, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(on_input(l), with_kwargs=True))
        handles.append(layer.register_forward_hook(on_output(l)))
        handles.append(adapter.mlp_output(layer).register_forward_hook(on_projection(l)))
    device = model_device(model)
    try:
        with torch.no_grad(), full_precision():
            for batch in tqdm(tokens.split(batch_size), desc="depth statistics", unit="batch", disable=not progress):
                model.base_model(input_ids=batch.to(device), use_cache=False)  # the layers' outputs, no logits
                stats.count += batch.numel()
                for store in (stream, before, mlp_io):  # one batch's tensors only
                    store.clear()
    finally:
        for handle in handles:
            handle.remove()
    stats.grams = {i: g.cpu() for i, g in stats.grams.items()}
    stats.cross = {i: c.cpu() for i, c in stats.cross.items()}
    return stats


def patch_weight(stats: DepthStats, i: int, weight: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float, float]:
    """Layer ``i - 1``'s patched MLP output projection weight ``[out, in]`` for the span starting at ``i``, and the
    relative errors the span's removal leaves on the calibration tokens without and with it."""
    gram, cross = stats.grams[i], stats.cross[i]
    w_t = weight.detach().to(dtype=torch.float64, device=gram.device).T
    lam = ridge * float(gram.diagonal().mean())
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    try:
        patched_t = torch.linalg.solve(gram + lam * eye, cross + lam * w_t)
    except torch.linalg.LinAlgError:
        raise NumpruneError(f"the patch of the span starting at layer {i} is singular at ridge {ridge}; give a ridge "
                            "> 0 or calibrate on more tokens") from None

    def error(x_t: torch.Tensor) -> float:  # |a X - Y|^2 from the sums: tr(X^T G X) - 2 tr(X^T C) + |Y|^2
        return max(float((x_t * (gram @ x_t)).sum() - 2 * (x_t * cross).sum()) + stats.target_sq[i], 0.0)

    norm = max(stats.stream_sq[i], 1e-300)
    return patched_t.T, error(w_t) / norm, error(patched_t) / norm


def choose(adapter: Adapter, stats: DepthStats, selection: str, ridge: float,
           weight_of: Callable[[int], torch.Tensor] | None = None) -> tuple[DepthRecord, torch.Tensor | None]:
    """The layers to remove and, for ``patched``, the new weight of the layer before them. ``weight_of(l)``: layer
    ``l``'s MLP output projection weight ``[out, in]`` (default: the model's; a streamed model reads it from disk)."""
    layers, depth = adapter.num_layers(), stats.depth
    if selection == "shortgpt":
        influence = [v / stats.count for v in stats.influence]
        removed = sorted(sorted(range(layers), key=lambda l: (influence[l], l))[:depth])
        span = [i for i in stats.angular if removed == list(range(i, i + depth))]
        return DepthRecord(selection, layers, removed, None, None, None, None,
                           stats.angular[span[0]] / stats.count if span else None,
                           {str(l): v for l, v in enumerate(influence)}), None
    fits = {}
    for i in stats.grams:
        weight = (weight_of or (lambda l: projection_weight(adapter.mlp_output(adapter.layers()[l]))))(i - 1)
        fits[i] = patch_weight(stats, i, weight, ridge)
    best = min(fits, key=lambda i: (fits[i][2], i))
    weight, before, after = fits[best]
    record = DepthRecord(selection, layers, list(range(best, best + depth)), ridge, best - 1, before, after,
                         stats.angular[best] / stats.count,
                         {f"{i}-{i + depth}": fits[i][2] for i in fits}, [best - 1], [[before, after]])
    return record, weight


def _span_bytes(adapter: Adapter, start: int) -> int:
    """The float64 sums one candidate span starting at ``start`` holds: G and C of layer ``start - 1``'s MLP output
    projection (``in x in`` and ``in x hidden``)."""
    outputs, inputs = projection_weight(adapter.mlp_output(adapter.layers()[start - 1])).shape
    return 8 * inputs * (inputs + outputs)


def select_layers(model: PreTrainedModel, tokens: torch.Tensor, depth: int, selection: str, ridge: float,
                  batch_size: int = 8, progress: bool = True, weight_of: Callable[[int], torch.Tensor] | None = None
                  ) -> tuple[DepthRecord, torch.Tensor | None]:
    """``choose`` over every candidate, from as many calibration passes as memory needs: the spans' sums (about
    1 GiB per span at a 7B shape) are collected a group at a time, the group as large as half the free memory
    holds, each group's patches fitted and only the best weight kept. ``scattered`` and ``shortgpt`` need
    ShortGPT's influence only (one pass, no sums)."""
    adapter = adapter_for(model)
    if selection != "patched":
        stats = collect_depth_stats(model, tokens, depth, batch_size, progress, starts=[])
        with full_precision():
            return choose(adapter, stats, "shortgpt", ridge)
    starts = list(range(1, adapter.num_layers() - depth + 1))
    per_span = max(_span_bytes(adapter, i) for i in starts)
    group = max(1, free_memory(model_device(model)) // 2 // per_span)
    best, candidates = None, {}
    for first in range(0, len(starts), group):
        stats = collect_depth_stats(model, tokens, depth, batch_size, progress, starts=starts[first:first + group])
        with full_precision():
            record, weight = choose(adapter, stats, selection, ridge, weight_of)
        del stats
        candidates.update(record.candidates)
        if best is None or (record.relative_error_after_patch, record.patched_layer) < (
                best[0].relative_error_after_patch, best[0].patched_layer):
            best = record, weight
    record, weight = best
    record.candidates = candidates
    return record, weight


def shallower_config(config, kept: list[int], layers: int):
    """A copy of ``config`` (of a model with ``layers`` layers) for the model that keeps only the layers ``kept``:
    the stock config with a smaller layer count and its per-layer lists cut to match."""
    config = config.__class__.from_dict(config.to_dict())
    config.num_hidden_layers = len(kept)
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == layers:
            setattr(config, name, [values[l] for l in kept])
    return config


def without_layers(model: PreTrainedModel, removed: list[int], patch: tuple[int, torch.Tensor] | None = None
                   ) -> PreTrainedModel:
    """A new model with ``removed`` layers gone and the rest renumbered (each attention's cache index, the config's
    layer count and per-layer lists), built from its config as ``from_pretrained`` will rebuild the saved folder;
    ``patch``: (layer, weight) for the MLP output projection of that (old-numbered) layer."""
    adapter = adapter_for(model)
    kept = [l for l in range(adapter.num_layers()) if l not in set(removed)]
    config = shallower_config(model.config, kept, adapter.num_layers())
    config._attn_implementation = model.config._attn_implementation
    prefix = adapter.layers_path + "."
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            index, rest = name[len(prefix):].split(".", 1)
            if int(index) not in new_index:
                continue
            name = f"{prefix}{new_index[int(index)]}.{rest}"
        state[name] = tensor
    if patch is not None:
        layer, weight = patch
        name = f"{prefix}{new_index[layer]}.{adapter.modules.mlp_output}.weight"
        state[name] = weight.to(dtype=state[name].dtype, device=state[name].device)
    reference = next(model.parameters())
    with torch.device(reference.device), no_init_weights():
        shrunk = AutoModelForCausalLM.from_config(config, dtype=reference.dtype)
    shrunk.load_state_dict(state, strict=True)
    shrunk.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        shrunk.generation_config = model.generation_config
    return shrunk.eval()


def prune_depth(model: PreTrainedModel, tokens: torch.Tensor, depth: int, selection: str = "patched",
                ridge: float = DEFAULT_RIDGE, batch_size: int = 8, progress: bool = True
                ) -> tuple[PreTrainedModel, DepthRecord]:
    """``model`` less ``depth`` layers (a new model; ``model`` is left untouched) and the record of what went."""
    check_depth(adapter_for(model), depth)
    record, weight = select_layers(model, tokens, depth, selection, ridge, batch_size, progress)
    if selection == "scattered":
        shallow, patched, errors = remove_scattered(model, tokens, record.removed_layers, ridge, batch_size, progress)
        record.selection, record.ridge, record.patched_layers, record.patch_errors = selection, ridge, patched, errors
        if patched:
            record.patched_layer = patched[0]
            record.relative_error_before_patch = sum(e[0] for e in errors) / len(errors)
            record.relative_error_after_patch = sum(e[1] for e in errors) / len(errors)
        return shallow, record
    patch = (record.patched_layer, weight) if weight is not None else None
    return without_layers(model, record.removed_layers, patch), record


def _runs(layers: list[int]) -> list[list[int]]:
    """Sorted ``layers`` cut into runs of consecutive ones."""
    runs: list[list[int]] = []
    for l in sorted(layers):
        if runs and runs[-1][-1] == l - 1:
            runs[-1].append(l)
        else:
            runs.append([l])
    return runs


def remove_scattered(model: PreTrainedModel, tokens: torch.Tensor, removed: list[int], ridge: float,
                     batch_size: int = 8, progress: bool = True
                     ) -> tuple[PreTrainedModel, list[int], list[list[float]]]:
    """``model`` less ``removed`` (consecutive or not), each run of consecutive layers patched in the layer before it,
    front to back: each patch is fitted on the model that already lost the earlier runs (one calibration pass per
    run, over that run's span only). Returns the model, the (old-numbered) patched layers and each patch's
    calibration errors without and with it."""
    current, gone, patched, errors = model, 0, [], []
    for run in _runs(removed):
        start = run[0] - gone  # the run's first layer in the current numbering
        if start == 0:  # no layer before it to carry a patch
            current = without_layers(current, list(range(len(run))))
        else:
            stats = collect_depth_stats(current, tokens, len(run), batch_size, progress, starts=[start])
            adapter = adapter_for(current)
            with full_precision():
                weight, before, after = patch_weight(
                    stats, start, projection_weight(adapter.mlp_output(adapter.layers()[start - 1])), ridge)
            current = without_layers(current, list(range(start, start + len(run))), (start - 1, weight))
            patched.append(run[0] - 1)
            errors.append([before, after])
        gone += len(run)
    return current, patched, errors
