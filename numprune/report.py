"""What a pruning run reports (pruning_report.json), typed, and the clock that times it.

``PruneReport`` is built by numprune.pipeline; the command line fills in what it knows beyond the
run (the model's name) and what an evaluation measured of the dense and the pruned model.
``to_json`` gives the report as saved; the report also reads like that dict (``report["parameters"]``),
so code written against saved reports reads a fresh one the same way.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from numprune.adapters import Adapter, LayerPlan
from numprune.errors import NumpruneError
from numprune.recipe import SHARE, PruneOptions, is_int
from numprune.version import VERSION

REPORT_NAME = "pruning_report.json"


def parameter_counts(adapter: Adapter) -> dict:
    """All parameters, and those that heads and channels carry (what the ratio is a fraction of)."""
    return {"total": sum(p.numel() for p in adapter.model.parameters()),
            "attention_mlp": sum(adapter.prunable_parameters(i) for i in range(adapter.num_layers()))}


def removed_share(before: int, after: int) -> float:
    """The fraction of ``before`` parameters that are gone once ``after`` remain."""
    return (before - after) / before


@dataclass(frozen=True)
class ParameterReport:
    total_before: int
    total_after: int
    attention_mlp_before: int
    attention_mlp_after: int
    target_ratio: float

    @property
    def achieved_ratio(self) -> float:
        return removed_share(self.attention_mlp_before, self.attention_mlp_after)

    def to_json(self) -> dict:
        return {**asdict(self), "achieved_ratio": self.achieved_ratio}


def counted_from_dense(parameters: ParameterReport, before: dict, shallow: dict, ratio: float) -> ParameterReport:
    """A run that removed layers first: its parameters counted from the dense model's ``before`` (not the
    ``shallow`` one the width step started from), its target the layers' share and then ``ratio`` of the rest."""
    target = 1 - (1 - removed_share(before["attention_mlp"], shallow["attention_mlp"])) * (1 - ratio)
    return ParameterReport(before["total"], parameters.total_after, before["attention_mlp"],
                           parameters.attention_mlp_after, target)


@dataclass(frozen=True)
class ComputeRecord:
    """Where the layer passes ran."""

    device: str
    dtype: str
    world_size: int
    streaming: bool = False  # written only when true

    def to_json(self) -> dict:
        record = asdict(self)
        if not self.streaming:
            del record["streaming"]
        return record


@dataclass(eq=False)
class PruneReport(Mapping):
    """pruning_report.json: options, parameters, per-layer widths, time and memory, and what was measured."""

    method: str
    options: PruneOptions  # the whole recipe, depth included
    calibration: dict  # the calibration source's own record, with the token count and speed
    parameters: ParameterReport
    layers: list[LayerPlan]
    config_class: str
    loads_without_numprune: bool
    compute: ComputeRecord
    time_s: dict[str, float]
    peak_rss_bytes: int
    peak_gpu_bytes: int | None = None  # on CUDA only
    model: str | None = None  # what was pruned: a name or a folder
    # an evaluation's dense-vs-pruned record under its report key (``Evaluation.compared``), as saved
    measured: dict[str, dict] = field(default_factory=dict)
    healing: dict | None = None  # numprune.heal's record (HealRecord.to_json), when the run healed
    numprune_version: str = VERSION  # which numprune pruned it (the same options may prune differently elsewhere)
    auto_allocation: dict | None = None  # the auto allocation's candidates, held-out figures and choice
    depth: dict | None = None  # the depth step's record (numprune.depth.DepthRecord), when layers were removed

    def to_json(self) -> dict:
        """The report as pruning_report.json holds it; fields that were not set are left out."""
        report = {
            "numprune_version": self.numprune_version,
            "method": self.method,
            "options": asdict(self.options),
            "calibration": self.calibration,
            "parameters": self.parameters.to_json(),
            "layers": [layer_report(p) for p in self.layers],
            "config_class": self.config_class,
            "loads_without_numprune": self.loads_without_numprune,
            "compute": self.compute.to_json(),
            "time_s": self.time_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "model": self.model,
            "healing": self.healing,
            "auto_allocation": self.auto_allocation,
            "depth": self.depth,
            **self.measured,
        }
        return {key: value for key, value in report.items() if value is not None}

    def __getitem__(self, key: str):
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


# The fields readers of a saved report use (bench's ratio, the GGUF metadata), and what each must be.
READ_FIELDS = {("method",): (lambda v: isinstance(v, str), "a name"),
               ("options", "allocation"): (lambda v: isinstance(v, str), "a name"),
               ("options", "compensation"): (lambda v: isinstance(v, str), "a name"),
               ("parameters", "target_ratio"): (SHARE.accepts, SHARE.says),
               ("parameters", "achieved_ratio"): (SHARE.accepts, SHARE.says),
               ("parameters", "total_before"): (lambda v: is_int(v) and v >= 0, "a count"),
               ("parameters", "total_after"): (lambda v: is_int(v) and v >= 0, "a count")}


def check_report(report: Mapping, where) -> dict:
    """``report`` as a dict, once every field readers use is there and of its kind; else one line naming the first
    that is not (a hand-edited or truncated pruning_report.json, ``{}``)."""
    report = report.to_json() if isinstance(report, PruneReport) else report
    for path, (accepts, says) in READ_FIELDS.items():
        value = report
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is None or not accepts(value):
            raise NumpruneError(f"{where} is not a valid pruning report ({'.'.join(path)} must be {says}, got "
                                f"{'nothing' if value is None else repr(value)[:40]})")
    return dict(report)


def layer_report(plan: LayerPlan) -> dict:
    return {"heads": len(plan.heads), "kv_heads": len(plan.kv_heads), "channels": len(plan.channels),
            "kept_heads": list(plan.heads), "kept_kv_heads": list(plan.kv_heads)}


class Clock:
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

    def times(self) -> dict[str, float]:
        """Each stage's time and the total, in seconds (what the report's ``time_s`` holds)."""
        return {**{k: round(v, 3) for k, v in self.laps.items()}, "total": self.total}
