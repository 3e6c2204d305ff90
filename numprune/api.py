"""The Python API: the pruning run read top to bottom (calibrate, score, allocate, compensate, shrink).

The run visits one decoder layer at a time through a *layer source*: ``InMemory`` hands out the
layers of a loaded model; numprune.stream's ``StreamedModel`` reads each from disk and frees it
after, and writes each shrunk layer as soon as it is compensated. Both go through the same body
(``_select`` then ``_compensate``), so they give the same result.
"""

from __future__ import annotations

import copy
import inspect
import math
import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from numprune import compensate, distributed
from numprune.adapters import Adapter, LayerPlan, adapter_for
from numprune.adapters.base import projection_weight
from numprune.allocate import ALLOCATIONS, GQA_UNITS, GUIDED, allocate, layer_guide
from numprune.calibrate import LayerStats, LayerStream, StatsStore, collect_statistics
from numprune.criteria import CriterionInputs, LayerScores, get_method
from numprune.errors import NumpruneError
from numprune.shrink import shrink

COMPENSATION_STATS = ("dense", "sequential")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# round_to is refused when the widths it rounds to would move the removed share by more than this
# fraction of the target (e.g. 8.9% removed against 30%).
ROUND_TO_TOLERANCE = 0.5
MAX_SEED = 2**32 - 1  # seeds torch and numpy both take


@dataclass
class PruneOptions:
    """Everything that decides a pruning run's result (recorded verbatim in the report)."""

    ratio: float
    method: str = "numerical"
    allocation: str | None = None  # None: the method's own (see criteria.methods)
    gqa_unit: str = "query"
    round_to: int = 1
    compensation: str | None = None  # None: the method's own
    compensation_stats: str = "dense"
    compensation_damp: float | None = None  # None: the method's own with its compensation, else 0.01
    allocation_compensation: str | None = None  # compensated-error: whose error curves guide it (None: the run's own)
    score_options: dict = field(default_factory=dict)

    def resolve(self) -> None:
        """Check every option and fill in the method's defaults."""
        if not _is_number(self.ratio):
            raise NumpruneError(f"ratio must be a number, got {self.ratio!r}")
        if not 0.0 < self.ratio < 1.0:
            raise NumpruneError(f"ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        if not isinstance(self.method, str):
            raise NumpruneError(f"method must be a name, got {self.method!r}")
        method = get_method(self.method)
        self.allocation = self.allocation or method.allocation
        own_compensation = self.compensation in (None, method.compensation)
        self.compensation = self.compensation or method.compensation
        if self.compensation not in compensate.REGISTRY:
            raise NumpruneError(f"unknown compensation {self.compensation!r}; choose from "
                                f"{', '.join(compensate.COMPENSATIONS)}")
        self.allocation_compensation = self.allocation_compensation or self.compensation
        if self.allocation_compensation not in compensate.REGISTRY:
            raise NumpruneError(f"unknown compensation {self.allocation_compensation!r} for the allocation; choose "
                                f"from {', '.join(compensate.COMPENSATIONS)}")
        if self.compensation_damp is None:  # the method's own damping goes with its own compensation
            self.compensation_damp = (method.compensation_damp if own_compensation
                                      else compensate.Damped.compensation_damp)
        self.score_options = {**method.score_options, **self.score_options}
        for value, allowed, what in ((self.allocation, ALLOCATIONS, "allocation"), (self.gqa_unit, GQA_UNITS, "GQA unit"),
                                     (self.compensation_stats, COMPENSATION_STATS, "compensation statistics")):
            if value not in allowed:
                raise NumpruneError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        if not _is_number(self.compensation_damp) or not 0 <= self.compensation_damp < math.inf:
            raise NumpruneError(f"compensation damping must be a finite number >= 0, got {self.compensation_damp!r}")
        if not _is_int(self.round_to) or self.round_to < 1:
            raise NumpruneError(f"round_to must be a positive integer, got {self.round_to!r}")
        _check_score_options(method.criterion, self.score_options, self.method)

    def compensation_options(self, name: str | None = None):
        """The resolved options of compensation ``name`` (default: the run's), as its registry entry declares them."""
        options = compensate.REGISTRY[name or self.compensation].options
        return options(**{f.name: getattr(self, f.name) for f in fields(options)})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count or a seed here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_score_options(criterion, options, method: str) -> None:
    """The criterion's own options: names it takes; iterations a positive integer; damping and lambda finite, >= 0."""
    if not isinstance(options, dict):
        raise NumpruneError(f"score options must be a dict, got {options!r}")
    accepted = [n for n, p in inspect.signature(criterion).parameters.items() if p.kind is p.KEYWORD_ONLY]
    for name, value in options.items():
        if name not in accepted:
            raise NumpruneError(f"method {method} takes no option {name!r}; it takes {', '.join(accepted) or 'none'}")
        if name == "iterations" and (not _is_int(value) or value < 1):
            raise NumpruneError(f"iterations must be a positive integer, got {value!r}")
        if name in ("damp", "lambda_rel") and (not _is_number(value) or not 0 <= value < math.inf):
            raise NumpruneError(f"{name} must be a finite number >= 0, got {value!r}")
        if name == "seed" and (not _is_int(value) or not 0 <= value <= MAX_SEED):
            raise NumpruneError(f"seed must be an integer between 0 and {MAX_SEED}, got {value!r}")


@dataclass
class Compute:
    """Where and how the layer passes run; none of it changes the result beyond float rounding."""

    batch_size: int = 8
    progress: bool = True
    device: torch.device | str | None = None  # None: where the model's input embeddings are
    dtype: torch.dtype | None = None  # None: the weights' own

    def stream(self, adapter: Adapter, tokens: torch.Tensor) -> LayerStream:
        """This process's share of ``tokens`` streamed into the first layer, statistics summed over processes."""
        return LayerStream(adapter.model, adapter, distributed.shard(tokens), self.batch_size, self.device, self.dtype,
                           distributed.reducer())

    def describe(self, adapter: Adapter) -> dict:
        device = self.device if self.device is not None else adapter.model.get_input_embeddings().weight.device
        dtype = self.dtype or next(p for p in adapter.model.parameters()).dtype
        return {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "world_size": distributed.world().size}


class InMemory:
    """The layer source of a loaded model: its layers as they are."""

    def __init__(self, model: nn.Module):
        self.adapter = adapter_for(model)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        yield self.adapter.layers()[i]

    def inputs(self):
        """What the first layer's inputs need is loaded already."""
        return nullcontext()

    def done(self, i: int, layer: nn.Module, plan: LayerPlan) -> None:
        """Nothing to do: ``shrink`` slices the whole model at the end."""


def calibrate(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Sequence[LayerStats]:
    """Statistics of every layer on the dense model; reusable for several ratios and methods."""
    adapter = adapter_for(model)
    _check_tokens(adapter, tokens)
    _check_compute(batch_size, device)
    return collect_statistics(model, adapter, distributed.shard(tokens), batch_size, progress, device=device,
                              dtype=dtype, reduce=distributed.reducer())


def prune(model: nn.Module, tokens: torch.Tensor | None = None, *, ratio: float, stats: Sequence[LayerStats] | None = None,
          inplace: bool = False, batch_size: int = 8, progress: bool = True, calibration_info: dict | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype | None = None, **options) -> tuple[nn.Module, dict]:
    """Prune ``model`` and return the narrower model and its report.

    ``tokens`` ([samples, seqlen] token ids) calibrate the run unless ``stats`` from ``calibrate``
    are given; sequential compensation statistics always need ``tokens``. ``options`` are the
    fields of PruneOptions. Unless ``inplace``, ``model`` is left untouched (it is copied first).
    ``device``/``dtype`` say where and in what precision the layer passes run (the model stays
    where it is; statistics and solves stay in float64). Inside a torch.distributed process group
    each process calibrates on its share of ``tokens`` and all return the same result.
    """
    opts = _resolve(ratio, options, tokens, stats)
    _check_compute(batch_size, device)
    compute = Compute(batch_size, progress, device, dtype)
    clock = _Clock(device)
    source = InMemory(model)
    check_run(source.adapter, tokens, stats, opts)
    before = parameter_counts(source.adapter)
    plans, stats = _select(source, tokens, stats, opts, compute, clock)

    if not inplace:
        model = copy.deepcopy(model)
        source = InMemory(model)
    _compensate(source.adapter, plans, stats, tokens, opts, batch_size, progress, source=source, compute=compute,
                clock=clock)
    with clock.timed("surgery"):
        pruned = shrink(source.adapter, plans)
    return pruned, _report(opts, tokens, calibration_info, before, pruned, plans, clock, compute.describe(source.adapter))


def _resolve(ratio: float, options: dict, tokens, stats) -> PruneOptions:
    """Checked options; the calibration tokens are there when needed."""
    unknown = sorted(set(options) - {f.name for f in fields(PruneOptions)} - {"ratio"})
    if unknown:
        raise NumpruneError(f"unknown option {unknown[0]!r}; the options are "
                            f"{', '.join(f.name for f in fields(PruneOptions) if f.name != 'ratio')}")
    opts = PruneOptions(ratio=ratio, **options)
    opts.resolve()
    if tokens is None and (stats is None or opts.compensation_stats == "sequential"):
        raise NumpruneError("calibration tokens are needed" + (" for sequential compensation statistics"
                                                               if stats is not None else ""))
    return opts


def _check_compute(batch_size, device) -> None:
    if not _is_int(batch_size) or batch_size < 1:
        raise NumpruneError(f"batch size must be a positive integer, got {batch_size!r}")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError):
            raise NumpruneError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None


def _check_tokens(adapter: Adapter, tokens) -> None:
    """Calibration tokens: a non-empty integer tensor [samples, seqlen] of ids the model has, windows it can read."""
    if tokens is None:
        return
    if not torch.is_tensor(tokens) or tokens.dtype in (torch.bool, *FLOAT_DTYPES) or tokens.is_complex():
        raise NumpruneError(f"calibration tokens must be an integer tensor of token ids, got "
                            f"{tokens.dtype if torch.is_tensor(tokens) else type(tokens).__name__}")
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise NumpruneError(f"calibration tokens must have shape [samples, seqlen], both at least 1, got "
                            f"{tuple(tokens.shape)}")
    vocab = adapter.model.get_input_embeddings().num_embeddings
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise NumpruneError(f"calibration tokens must be ids between 0 and {vocab - 1}, got values from "
                            f"{int(tokens.min())} to {int(tokens.max())}")
    adapter.check_window(tokens.shape[1])


def check_run(adapter: Adapter, tokens, stats, opts: PruneOptions) -> None:
    """Everything the inputs' shapes decide, before calibration: the tokens, statistics of this model, and
    an allocation that exists (a dry run on equal scores: feasibility and widths depend on shapes only)."""
    _check_tokens(adapter, tokens)
    if stats is not None:
        _check_stats(adapter, stats)
    elif tokens is not None:
        _check_activation_memory(adapter, tokens)
    layers = range(adapter.num_layers())
    equal = [LayerScores(torch.zeros(adapter.attention_layout(i).num_heads, dtype=torch.float64),
                         torch.zeros(adapter.mlp_width(i), dtype=torch.float64)) for i in layers]
    # A guided allocation ranks across layers like the global one: the same shapes decide whether it exists.
    mode = "global" if opts.allocation in GUIDED else opts.allocation
    plans = allocate(adapter, equal, opts.ratio, mode, opts.gqa_unit, opts.round_to)
    if opts.round_to > 1:
        removed = sum(_removed_parameters(adapter, i, plans[i]) for i in layers)
        achieved = removed / sum(adapter.prunable_parameters(i) for i in layers)
        if abs(achieved - opts.ratio) > ROUND_TO_TOLERANCE * opts.ratio:
            raise NumpruneError(f"round_to {opts.round_to} would remove {achieved:.1%} of the attention+MLP parameters "
                                f"against a target of {opts.ratio:.1%}; choose a smaller multiple")


def _check_activation_memory(adapter: Adapter, tokens: torch.Tensor) -> None:
    """Calibration keeps every window's hidden states (in and out of the layer being visited): refuse, before
    any work, a token count whose activations could not fit in this machine's free memory."""
    weight = adapter.model.get_input_embeddings().weight
    needed = 2 * tokens.numel() * weight.shape[1] * weight.element_size()
    available = psutil.virtual_memory().available
    if needed > available:
        raise NumpruneError(f"calibrating on {tokens.numel():,} tokens holds about {needed / 2**30:.1f} GiB of "
                            f"activations; {available / 2**30:.1f} GiB of memory is free")


def _removed_parameters(adapter: Adapter, i: int, plan: LayerPlan) -> int:
    full, costs = adapter.full_plan(i), adapter.unit_costs(i)
    return ((len(full.heads) - len(plan.heads)) * costs.query_head + (len(full.kv_heads) - len(plan.kv_heads))
            * costs.kv_head + (len(full.channels) - len(plan.channels)) * costs.channel)


def _check_stats(adapter: Adapter, stats) -> None:
    """Statistics from ``calibrate`` on a model of this shape (one entry per layer, matching widths)."""
    if len(stats) != adapter.num_layers():
        raise NumpruneError(f"the statistics are for {len(stats)} layers; this model has {adapter.num_layers()}")
    for i in sorted({0, adapter.num_layers() - 1}):
        layer = adapter.layers()[i]
        widths = [projection_weight(adapter.attention_output(layer)).shape[1],
                  projection_weight(adapter.mlp_output(layer)).shape[1]]
        got = [stats[i].attention.gram.shape[0], stats[i].mlp.gram.shape[0]]
        if got != widths:
            raise NumpruneError(f"the statistics do not belong to this model: layer {i} has inputs of widths "
                                f"{widths[0]} and {widths[1]}, the statistics {got[0]} and {got[1]}")


def _select(source, tokens: torch.Tensor | None, stats: Sequence[LayerStats] | None, opts: PruneOptions,
            compute: Compute, clock: _Clock) -> tuple[list[LayerPlan], Sequence[LayerStats]]:
    """Calibrate (unless ``stats`` are given), score and allocate, visiting each layer once."""
    adapter = source.adapter
    distributed.agree("the options", asdict(opts))
    distributed.agree("the model's shape", [adapter.prunable_parameters(i) for i in range(adapter.num_layers())])
    stream = None
    if stats is None:
        distributed.agree("the calibration tokens", tokens)
        with source.inputs(), clock.timed("calibration"):
            stream = compute.stream(adapter, tokens)
        stats = StatsStore()
    criterion = get_method(opts.method).criterion
    scores, guides = [], []
    for i in tqdm(range(adapter.num_layers()), desc="calibrating" if stream else "scoring", unit="layer",
                  disable=not compute.progress):
        with source.layer(i) as layer:
            if stream is not None:
                with clock.timed("calibration"):
                    stats.append(stream.run(layer, collect=True, advance=True))
            with clock.timed("scoring"):
                inputs = _criterion_inputs(adapter, i, stats[i], opts.ratio)
                scores.append(criterion(inputs, **opts.score_options))
                guides.append(layer_guide(opts.allocation, adapter, inputs, scores[-1], opts.allocation_compensation,
                                          opts.compensation_options(opts.allocation_compensation), opts.gqa_unit))
    del stream
    with clock.timed("scoring"):
        plans = allocate(adapter, scores, opts.ratio, opts.allocation, opts.gqa_unit, opts.round_to, guides)
    distributed.agree("the allocation", [asdict(p) for p in plans])
    return plans, stats


def _report(opts: PruneOptions, tokens, calibration_info: dict | None, before: dict, pruned: nn.Module,
            plans: list[LayerPlan], clock: _Clock, compute: dict) -> dict:
    """pruning_report.json: options, parameters, per-layer widths, time and memory."""
    calibration = {**(calibration_info or {})}
    if tokens is not None:
        calibration["tokens"] = int(tokens.numel())
        if "calibration" in clock.laps:
            calibration["tokens_per_s"] = round(tokens.numel() / max(clock.laps["calibration"], 1e-9), 1)
    return {
        "method": opts.method,
        "options": asdict(opts),
        "calibration": calibration,
        "parameters": _parameter_report(before, parameter_counts(adapter_for(pruned)), opts.ratio),
        "layers": [_layer_report(p) for p in plans],
        "config_class": type(pruned.config).__name__,
        "loads_without_numprune": not type(pruned.config).__module__.startswith("numprune"),
        "compute": compute,
        "time_s": {**{k: round(v, 3) for k, v in clock.laps.items()}, "total": clock.total},
        "peak_rss_bytes": clock.peak_rss,
        **({"peak_gpu_bytes": clock.peak_gpu} if clock.peak_gpu is not None else {}),
    }


def _criterion_inputs(adapter: Adapter, i: int, stats: LayerStats, ratio: float) -> CriterionInputs:
    layer = adapter.layers()[i]
    return CriterionInputs(i, stats, projection_weight(adapter.attention_output(layer)).detach(),
                           projection_weight(adapter.mlp_output(layer)).detach(), adapter.attention_layout(i), ratio)


def _compensate(adapter: Adapter, plans: list[LayerPlan], stats: Sequence[LayerStats], tokens, opts: PruneOptions,
                batch_size: int, progress: bool, *, source=None, compute: Compute | None = None,
                clock: _Clock | None = None) -> None:
    """Mask (and, unless disabled, refit) every layer's output projections in place.

    ``dense`` statistics come from the unpruned model (the calibration pass); ``sequential`` ones
    are re-collected with the layers upstream already pruned and compensated, so each layer
    corrects the drift of those before it. ``source.done`` receives each layer once compensated.
    """
    source = source or InMemory(adapter.model)
    compute = compute or Compute(batch_size, progress)
    clock = clock or _Clock()
    stream = None
    compensation, options = compensate.REGISTRY[opts.compensation], opts.compensation_options()
    if opts.compensation_stats == "sequential":
        with source.inputs(), clock.timed("compensation"):
            stream = compute.stream(adapter, tokens)
    for i in tqdm(range(adapter.num_layers()), desc="compensating", unit="layer", disable=not progress):
        with source.layer(i) as layer:
            with clock.timed("compensation"):
                if not compensation.needs:
                    layer_stats = None
                elif stream is None:
                    layer_stats = stats[i]
                else:
                    layer_stats = stream.run(layer, collect=True, advance=False)
                kept = adapter.kept_inputs(i, plans[i])
                outputs = (adapter.attention_output(layer), adapter.mlp_output(layer))
                parts = (layer_stats.attention, layer_stats.mlp) if layer_stats is not None else (None, None)
                for linear, keep, s in zip(outputs, kept, parts):
                    fit = compensation.fit(projection_weight(linear).detach(), s, keep, options)
                    compensate.apply(linear, keep, fit)
                if stream is not None:
                    stream.run(layer, collect=False, advance=True)
            with clock.timed("surgery"):
                source.done(i, layer, plans[i])


def parameter_counts(adapter: Adapter) -> dict:
    """All parameters, and those that heads and channels carry (what the ratio is a fraction of)."""
    return {"total": sum(p.numel() for p in adapter.model.parameters()),
            "attention_mlp": sum(adapter.prunable_parameters(i) for i in range(adapter.num_layers()))}


def _parameter_report(before: dict, after: dict, ratio: float) -> dict:
    removed = before["attention_mlp"] - after["attention_mlp"]
    return {"total_before": before["total"], "total_after": after["total"],
            "attention_mlp_before": before["attention_mlp"], "attention_mlp_after": after["attention_mlp"],
            "target_ratio": ratio, "achieved_ratio": removed / before["attention_mlp"]}


def _layer_report(plan: LayerPlan) -> dict:
    return {"heads": len(plan.heads), "kv_heads": len(plan.kv_heads), "channels": len(plan.channels),
            "kept_heads": list(plan.heads), "kept_kv_heads": list(plan.kv_heads)}


class _Clock:
    """Wall time per stage (summed over every visit) and the process's peak CPU and GPU memory."""

    def __init__(self, device: torch.device | str | None = None):
        self.start = time.perf_counter()
        self.laps: dict[str, float] = {}
        self.cuda = device is not None and torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.laps[stage] = self.laps.get(stage, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)

    @property
    def peak_rss(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    @property
    def peak_gpu(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None
