"""The Python API for a loaded model: ``calibrate`` and ``prune``.

Both are thin entries over numprune.pipeline (the run's body: check, select, compensate, report)
with an ``InMemory`` layer source (numprune.sources); the options are numprune.recipe's
``PruneOptions``, the report numprune.report's ``PruneReport``. numprune.stream's
``prune_streaming`` is the same body over layers read from disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from numprune import auto, distributed
from numprune.adapters import adapter_for
from numprune.allocate import AUTO
from numprune.calibrate import LayerStats, collect_statistics
from numprune.depth import check_depth, prune_depth
from numprune.distill import memory_needed
from numprune.errors import NumpruneError
from numprune.heal import decide_mode, run_healing
from numprune.pipeline import (
    Compute,
    build_report,
    check_run,
    check_tokens,
    compensate,
    healing_for,
    layers_only_report,
    resolve,
    select,
)
from numprune.precision import free_memory, full_precision
from numprune.recipe import FLAG, PruneOptions, heal_fields
from numprune.report import Clock, PruneReport, counted_from_dense, parameter_counts
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


def prune(model: nn.Module, tokens: torch.Tensor | None = None, recipe: PruneOptions | None = None, *,
          stats: Sequence[LayerStats] | None = None, inplace: bool = False, batch_size: int = 8, progress: bool = True,
          calibration_info: dict | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype | None = None, holdout=None,
          **overrides) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` and return the narrower model and its report.

    ``tokens`` ([samples, seqlen] token ids) calibrate the run unless ``stats`` from ``calibrate``
    are given; sequential compensation statistics always need ``tokens``. The run follows ``recipe``
    (a PruneOptions) changed by ``overrides`` (its fields: ``ratio=0.3, method="numerical"``), or the
    ``overrides`` alone (``ratio`` is then needed). ``model`` is left untouched and never copied: the
    narrower model is built from it and the compensation's fits (numprune.shrink); with ``inplace`` it
    shares the tensors that do not shrink (embeddings, norms) with ``model``, which is then the caller's
    to drop. With ``heal`` (the default method's own) the pruned model is then healed toward ``model`` on
    ``tokens`` (numprune.heal: by distillation where its training fits in the free memory, else block-local,
    decided before the work; the report's options say which, its ``healing`` has the record).

    A recipe with ``depth`` > 0 first removes that many whole layers (numprune.depth: ``depth_selection``
    ``patched``, the span of consecutive layers whose least-squares patch, at ridge ``depth_ridge``, leaves the
    least error; ``shortgpt``, ShortGPT's least influential layers, no patch), on the model's own device; its
    ``ratio`` is then the share the width step removes from the remaining layers, calibrating on the depth-pruned
    model (``depth=4`` without a ratio, or ``ratio=0``: depth alone).

    The ``auto`` allocation measures its candidates on ``holdout`` (token ids [windows, length], or a
    dict of them by name); without it, the last eighth of ``tokens``' windows is held out from the
    calibration (numprune.auto).
    ``device``/``dtype`` say where and in what precision the layer passes run (default: the model's
    own device and dtype). The model may be anywhere and stays there: statistics and solves run in
    float64 without TF32, and each weight gets its result on its own device in its own dtype
    (numprune.precision). Inside a torch.distributed process group
    each process calibrates on its share of ``tokens`` and all return the same result.
    """
    opts = resolve(recipe, overrides, tokens, stats)
    if opts.depth:
        return _depth_first(model, tokens, opts, stats, batch_size, progress, calibration_info, device, dtype, holdout)
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
    opts = healing_for(source.adapter, opts)
    if inplace and opts.heal:
        raise NumpruneError("healing fits the pruned model to the dense one, whose norms and embeddings inplace=True "
                            "would share; prune with inplace=False, or without healing (heal=False)")
    where = compute.where(source.adapter)
    clock = Clock(where)
    check_run(source.adapter, tokens, stats, opts)
    if opts.heal:  # the mode decided on the pruned model's estimated need, before any long work
        asked = opts.heal_options()
        need = memory_needed(source.adapter, asked, tokens.shape[1], keep=1 - opts.ratio, resident=True)
        healing = decide_mode(asked, need, free_memory(where), tokens.numel())
        opts = opts.replace(**heal_fields(healing))
    before = parameter_counts(source.adapter)
    plans, stats = select(source, tokens, stats, opts, compute, clock)
    choice = None
    if opts.allocation == AUTO:  # the chosen candidate comes compensated
        plans, source.fits, choice = auto.choose(model, plans, stats, holdout, opts, compute, clock)
    else:
        compensate(source, plans, stats, tokens, opts, compute, clock)
    with clock.timed("surgery"):
        pruned = shrink(source.adapter, plans, source.fits, share=inplace)
    record = None
    if opts.heal:
        stats = None  # not needed any more: the memory goes to healing
        with clock.timed("healing"):
            record = run_healing(source, InMemory(pruned), tokens, healing, where, compute.progress)
    report = build_report(opts, tokens, calibration_info, before, pruned, plans, clock,
                          compute.describe(source.adapter))
    report.healing = record.to_json() if record is not None else None
    report.auto_allocation = choice
    return pruned, report


def _depth_first(model: nn.Module, tokens, opts: PruneOptions, stats, batch_size: int, progress: bool,
                 calibration_info: dict | None, device, dtype, holdout) -> tuple[nn.Module, PruneReport]:
    """Remove ``opts.depth`` layers, then (with a ratio) prune the width of the rest; one report for both, its
    parameters counted against ``model``, its options the whole recipe."""
    adapter = adapter_for(model)
    check_depth(adapter, opts.depth)
    if stats is not None:
        raise NumpruneError("depth pruning calibrates the width step on the depth-pruned model; give tokens, not stats")
    check_tokens(adapter, tokens)
    if opts.ratio:  # on the dense model's shapes, before any work; again on the shallower model's after
        check_run(adapter, tokens, None, opts.width_step())
    if holdout is not None and opts.allocation != AUTO:
        raise NumpruneError(f"held-out windows are for the auto allocation only, not {opts.allocation}")
    compute = Compute(batch_size, progress, device, dtype)
    clock = Clock(compute.where(adapter))
    before = parameter_counts(adapter)
    with clock.timed("depth"):
        shallow, record = prune_depth(model, tokens, opts.depth, opts.depth_selection, opts.depth_ridge, batch_size,
                                      progress)
    middle = parameter_counts(adapter_for(shallow))
    if opts.ratio == 0:
        report = layers_only_report(opts, tokens, calibration_info, before, shallow, clock,
                                    compute.describe(adapter_for(shallow)))
    else:
        shallow, report = prune(shallow, tokens, opts.width_step(), inplace=True, batch_size=batch_size, progress=progress,
                                calibration_info=calibration_info, device=device, dtype=dtype, holdout=holdout)
        report.options = opts
        report.time_s = {"depth": round(clock.laps["depth"], 3), **report.time_s,
                         "total": round(report.time_s["total"] + clock.laps["depth"], 3)}
    report.parameters = counted_from_dense(report.parameters, before, middle, opts.ratio)
    report.depth = record.to_json()
    return shallow, report
