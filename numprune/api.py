"""The Python API for a loaded model: ``calibrate`` and ``prune``.

Both are thin entries over numprune.pipeline (the run's body: check, select, compensate, report)
with an ``InMemory`` layer source (numprune.sources); the options are numprune.recipe's
``PruneOptions``, the report numprune.report's ``PruneReport``. numprune.stream's
``prune_streaming`` is the same body over layers read from disk.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from numprune import auto, distributed
from numprune.adapters import adapter_for
from numprune.allocate import AUTO
from numprune.calibrate import LayerStats, collect_statistics
from numprune.errors import NumpruneError
from numprune.pipeline import Compute, build_report, check_run, check_tokens, compensate, resolve, select
from numprune.precision import full_precision
from numprune.recipe import FLAG
from numprune.report import Clock, PruneReport, parameter_counts
from numprune.shrink import shrink
from numprune.sources import InMemory


def calibrate(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, progress: bool = True,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Sequence[LayerStats]:
    """Statistics of every layer on the dense model; reusable for several ratios and methods.

    The layer passes run on ``device`` (default: the model's own) in ``dtype`` (default: the weights'
    own); the statistics come back in float64 on the CPU (numprune.precision has the whole contract).
    """
    adapter = adapter_for(model)
    check_tokens(adapter, tokens)
    compute = Compute(batch_size, progress, device, dtype)
    with full_precision():
        return collect_statistics(model, adapter, distributed.shard(tokens), compute.batch_size, compute.progress,
                                  device=compute.where(adapter), dtype=compute.dtype, reduce=distributed.reducer())


def prune(model: nn.Module, tokens: torch.Tensor | None = None, *, ratio: float, stats: Sequence[LayerStats] | None = None,
          inplace: bool = False, batch_size: int = 8, progress: bool = True, calibration_info: dict | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype | None = None, holdout=None,
          **options) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` and return the narrower model and its report.

    ``tokens`` ([samples, seqlen] token ids) calibrate the run unless ``stats`` from ``calibrate``
    are given; sequential compensation statistics always need ``tokens``. ``options`` are the
    fields of PruneOptions. Unless ``inplace``, ``model`` is left untouched (it is copied first).
    ``device``/``dtype`` say where and in what precision the layer passes run (default: the model's
    own device and dtype). The model may be anywhere and stays there: statistics and solves run in
    float64 without TF32, and each weight gets its result on its own device in its own dtype
    (numprune.precision). Inside a torch.distributed process group
    each process calibrates on its share of ``tokens`` and all return the same result.

    The ``auto`` allocation measures its candidates on ``holdout`` (token ids [windows, length], or a
    dict of them by name); without it, the last eighth of ``tokens``' windows is held out from the
    calibration (numprune.auto).
    """
    opts = resolve(ratio, options, tokens, stats)
    if opts.allocation == AUTO:
        tokens, holdout = auto.split_holdout(tokens, stats, holdout)
        auto.check_holdout(model, holdout)
    elif holdout is not None:
        raise NumpruneError(f"held-out windows are for the auto allocation only, not {opts.allocation}")
    if calibration_info is not None and not isinstance(calibration_info, dict):
        raise NumpruneError(f"calibration_info must be a dict, got {type(calibration_info).__name__}")
    FLAG.check("inplace", inplace)
    compute = Compute(batch_size, progress, device, dtype)
    source = InMemory(model)
    clock = Clock(compute.where(source.adapter))
    check_run(source.adapter, tokens, stats, opts)
    before = parameter_counts(source.adapter)
    plans, stats = select(source, tokens, stats, opts, compute, clock)

    if not inplace:
        model = copy.deepcopy(model)
        source = InMemory(model)
    choice = None
    if opts.allocation == AUTO:
        plans, choice = auto.choose(model, plans, stats, holdout, opts, compute, clock)
    compensate(source, plans, stats, tokens, opts, compute, clock)
    with clock.timed("surgery"):
        pruned = shrink(source.adapter, plans)
    report = build_report(opts, tokens, calibration_info, before, pruned, plans, clock,
                          compute.describe(source.adapter))
    report.auto_allocation = choice
    return pruned, report
