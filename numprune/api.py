"""The Python API: the pruning run read top to bottom (calibrate, score, allocate, compensate, shrink)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
import resource
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from numprune import compensate
from numprune.adapters import Adapter, LayerPlan, adapter_for
from numprune.adapters.base import projection_weight
from numprune.allocate import ALLOCATIONS, GQA_UNITS, allocate
from numprune.calibrate import LayerStats, LayerStream, collect_statistics
from numprune.criteria import CriterionInputs, get_method
from numprune.errors import NumpruneError
from numprune.shrink import shrink

COMPENSATION_STATS = ("dense", "sequential")


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
    compensation_damp: float | None = None  # None: the method's own
    score_options: dict = field(default_factory=dict)

    def resolve(self) -> None:
        """Check every option and fill in the method's defaults."""
        if not 0.0 < self.ratio < 1.0:
            raise NumpruneError(f"ratio must be between 0 and 1 (exclusive), got {self.ratio}")
        method = get_method(self.method)
        self.allocation = self.allocation or method.allocation
        self.compensation = self.compensation or method.compensation
        if self.compensation_damp is None:
            self.compensation_damp = method.compensation_damp
        for value, allowed, what in ((self.allocation, ALLOCATIONS, "allocation"), (self.gqa_unit, GQA_UNITS, "GQA unit"),
                                     (self.compensation, compensate.COMPENSATIONS, "compensation"),
                                     (self.compensation_stats, COMPENSATION_STATS, "compensation statistics")):
            if value not in allowed:
                raise NumpruneError(f"unknown {what} {value!r}; choose from {', '.join(allowed)}")
        if self.compensation_damp < 0:
            raise NumpruneError("compensation damping must be >= 0")


def calibrate(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True) -> Sequence[LayerStats]:
    """Statistics of every layer on the dense model; reusable for several ratios and methods."""
    return collect_statistics(model, adapter_for(model), tokens, batch_size, progress)


def prune(model: nn.Module, tokens: torch.Tensor | None = None, *, ratio: float, stats: Sequence[LayerStats] | None = None,
          inplace: bool = False, batch_size: int = 8, progress: bool = True, calibration_info: dict | None = None,
          **options) -> tuple[nn.Module, dict]:
    """Prune ``model`` and return the narrower model and its report.

    ``tokens`` ([samples, seqlen] token ids) calibrate the run unless ``stats`` from ``calibrate``
    are given; sequential compensation statistics always need ``tokens``. ``options`` are the
    fields of PruneOptions. Unless ``inplace``, ``model`` is left untouched (it is copied first).
    """
    opts = PruneOptions(ratio=ratio, **options)
    opts.resolve()
    adapter = adapter_for(model)
    if tokens is None and (stats is None or opts.compensation_stats == "sequential"):
        raise NumpruneError("calibration tokens are needed" + (" for sequential compensation statistics"
                                                               if stats is not None else ""))
    clock = _Clock()
    before = parameter_counts(adapter)

    if stats is None:
        stats = collect_statistics(model, adapter, tokens, batch_size, progress)
        clock.lap("calibration")

    criterion = get_method(opts.method).criterion
    scores = [criterion(_criterion_inputs(adapter, i, s, ratio), **opts.score_options)
              for i, s in enumerate(tqdm(stats, desc="scoring", unit="layer", disable=not progress))]
    plans = allocate(adapter, scores, ratio, opts.allocation, opts.gqa_unit, opts.round_to)
    clock.lap("scoring")

    if not inplace:
        model = copy.deepcopy(model)
        adapter = adapter_for(model)
    _compensate(adapter, plans, stats, tokens, opts, batch_size, progress)
    clock.lap("compensation")

    pruned = shrink(adapter, plans)
    clock.lap("surgery")

    report = {
        "method": opts.method,
        "options": asdict(opts),
        "calibration": {**(calibration_info or {}), **({"tokens": int(tokens.numel())} if tokens is not None else {})},
        "parameters": _parameter_report(before, parameter_counts(adapter_for(pruned)), ratio),
        "layers": [_layer_report(p) for p in plans],
        "config_class": type(pruned.config).__name__,
        "loads_without_numprune": not type(pruned.config).__module__.startswith("numprune"),
        "time_s": {**clock.laps, "total": clock.total},
        "peak_rss_bytes": clock.peak_rss,
    }
    return pruned, report


def _criterion_inputs(adapter: Adapter, i: int, stats: LayerStats, ratio: float) -> CriterionInputs:
    layer = adapter.layers()[i]
    return CriterionInputs(i, stats, projection_weight(adapter.attention_output(layer)).detach(),
                           projection_weight(adapter.mlp_output(layer)).detach(), adapter.attention_layout(i), ratio)


def _compensate(adapter: Adapter, plans: list[LayerPlan], stats: Sequence[LayerStats], tokens, opts: PruneOptions,
                batch_size: int, progress: bool) -> None:
    """Mask (and, unless disabled, refit) every layer's output projections in place.

    ``dense`` statistics come from the unpruned model (the calibration pass); ``sequential`` ones
    are re-collected with the layers upstream already pruned and compensated, so each layer
    corrects the drift of those before it.
    """
    stream = LayerStream(adapter.model, adapter, tokens, batch_size) if opts.compensation_stats == "sequential" else None
    layers = adapter.layers()
    for i in tqdm(range(len(layers)), desc="compensating", unit="layer", disable=not progress):
        layer_stats = stats[i] if stream is None else stream.run(layers[i], collect=True, advance=False)
        kept = adapter.kept_inputs(i, plans[i])
        outputs = (adapter.attention_output(layers[i]), adapter.mlp_output(layers[i]))
        for linear, keep, s in zip(outputs, kept, (layer_stats.attention, layer_stats.mlp)):
            if opts.compensation == "bias":
                compensate.add_bias(linear, keep, s.mean)
            else:
                compensate.apply(linear, keep, s.gram if opts.compensation == "least-squares" else None,
                                 opts.compensation_damp)
        if stream is not None:
            stream.run(layers[i], collect=False, advance=True)


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
    """Wall time per stage and the process's peak resident memory."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self.last, 3)
        self.last = now

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)

    @property
    def peak_rss(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
