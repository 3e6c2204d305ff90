"""The Python API for a loaded model: ``calibrate`` and ``prune``.

Both are thin entries over numprune.pipeline (the run's body: check, select, compensate, report)
with an ``InMemory`` layer source (numprune.sources); the options are numprune.recipe's
``PruneOptions``, the report numprune.report's ``PruneReport``. numprune.stream's
``prune_streaming`` is the same body over layers read from disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import torch
from torch import nn

from numprune import auto, distributed
from numprune.adapters import adapter_for
from numprune.allocate import AUTO
from numprune.calibrate import LayerStats, collect_statistics
from numprune.depth import DEFAULT_RIDGE, DepthOnly, check_depth, prune_depth
from numprune.errors import NumpruneError
from numprune.heal import heal
from numprune.pipeline import Compute, build_report, check_run, check_tokens, compensate, resolve, select
from numprune.precision import full_precision
from numprune.recipe import FLAG, PruneOptions
from numprune.report import Clock, ParameterReport, PruneReport, parameter_counts, removed_share
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
          device: torch.device | str | None = None, dtype: torch.dtype | None = None, depth: int = 0,
          depth_selection: str = "patched", depth_ridge: float = DEFAULT_RIDGE, holdout=None,
          **overrides) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` and return the narrower model and its report.

    ``tokens`` ([samples, seqlen] token ids) calibrate the run unless ``stats`` from ``calibrate``
    are given; sequential compensation statistics always need ``tokens``. The run follows ``recipe``
    (a PruneOptions) changed by ``overrides`` (its fields: ``ratio=0.3, method="numerical"``), or the
    ``overrides`` alone (``ratio`` is then needed). ``model`` is left untouched and never copied: the
    narrower model is built from it and the compensation's fits (numprune.shrink); with ``inplace`` it
    shares the tensors that do not shrink (embeddings, norms) with ``model``, which is then the caller's
    to drop. With ``heal=True`` the pruned model is then healed toward ``model`` on ``tokens``
    (numprune.heal; the report's ``healing`` has its record).

    ``depth`` > 0 first removes that many whole layers (numprune.depth: ``depth_selection`` ``patched``, the
    span of consecutive layers whose least-squares patch, at ridge ``depth_ridge``, leaves the least error;
    ``shortgpt``, ShortGPT's least influential layers, no patch), on the model's own device; the recipe's
    ``ratio`` is then the share the width step removes from the remaining layers (no recipe and no ``ratio``:
    depth alone), calibrating on the depth-pruned model.

    The ``auto`` allocation measures its candidates on ``holdout`` (token ids [windows, length], or a
    dict of them by name); without it, the last eighth of ``tokens``' windows is held out from the
    calibration (numprune.auto).
    ``device``/``dtype`` say where and in what precision the layer passes run (default: the model's
    own device and dtype). The model may be anywhere and stays there: statistics and solves run in
    float64 without TF32, and each weight gets its result on its own device in its own dtype
    (numprune.precision). Inside a torch.distributed process group
    each process calibrates on its share of ``tokens`` and all return the same result.
    """
    if depth != 0:
        return _depth_first(model, tokens, recipe, overrides, stats, depth, depth_selection, depth_ridge, batch_size,
                            progress, calibration_info, device, dtype, holdout)
    opts = resolve(recipe, overrides, tokens, stats)
    if opts.allocation == AUTO:
        tokens, holdout = auto.split_holdout(tokens, stats, holdout)
        auto.check_holdout(model, holdout)
    elif holdout is not None:
        raise NumpruneError(f"held-out windows are for the auto allocation only, not {opts.allocation}")
    if calibration_info is not None and not isinstance(calibration_info, dict):
        raise NumpruneError(f"calibration_info must be a dict, got {type(calibration_info).__name__}")
    FLAG.check("inplace", inplace)
    if inplace and opts.heal:
        raise NumpruneError("healing fits the pruned model to the dense one, whose norms and embeddings inplace=True "
                            "would share; prune with inplace=False")
    compute = Compute(batch_size, progress, device, dtype)
    source = InMemory(model)
    clock = Clock(compute.where(source.adapter))
    check_run(source.adapter, tokens, stats, opts)
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
        with clock.timed("healing"):
            pruned, record = heal(model, pruned, tokens, progress=compute.progress, device=compute.device,
                                  **asdict(opts.heal_options()))
    report = build_report(opts, tokens, calibration_info, before, pruned, plans, clock,
                          compute.describe(source.adapter))
    report.healing = record.to_json() if record is not None else None
    report.auto_allocation = choice
    return pruned, report


def _depth_first(model: nn.Module, tokens, recipe: PruneOptions | None, overrides: dict, stats, depth: int,
                 selection: str, ridge: float, batch_size: int, progress: bool, calibration_info: dict | None, device,
                 dtype, holdout) -> tuple[nn.Module, PruneReport]:
    """Remove ``depth`` layers, then (given a recipe or a ratio) prune the width of the rest; one report for both,
    its parameters counted against ``model``."""
    adapter = adapter_for(model)
    check_depth(adapter, depth, selection, ridge)
    if stats is not None:
        raise NumpruneError("depth pruning calibrates the width step on the depth-pruned model; give tokens, not stats")
    if tokens is None:
        raise NumpruneError("depth pruning needs calibration tokens")
    check_tokens(adapter, tokens)
    if overrides.get("ratio") == 0:  # depth alone, said explicitly
        overrides = {k: v for k, v in overrides.items() if k != "ratio"}
        if overrides or recipe is not None:
            raise NumpruneError(f"{sorted(overrides)[0] if overrides else 'a recipe'} applies to width pruning, "
                                "which a ratio of 0 skips")
    width = resolve(recipe, overrides, tokens, None) if recipe is not None or overrides else None
    if width is not None and width.heal:
        raise NumpruneError("healing after depth pruning is not supported; heal a width-only run")
    compute = Compute(batch_size, progress, device, dtype)
    clock = Clock(compute.where(adapter))
    before = parameter_counts(adapter)
    with clock.timed("depth"):
        shallow, record = prune_depth(model, tokens, depth, selection, ridge, batch_size, progress)
    if width is None:
        after = parameter_counts(adapter_for(shallow))
        kept = adapter_for(shallow)
        report = build_report(DepthOnly(compensation="least-squares patch" if record.patched_layer is not None
                                        else "none"), tokens, calibration_info, before, shallow,
                              [kept.full_plan(i) for i in range(kept.num_layers())], clock, compute.describe(kept))
        report.parameters = ParameterReport(before["total"], after["total"], before["attention_mlp"],
                                            after["attention_mlp"],
                                            removed_share(before["attention_mlp"], after["attention_mlp"]))
    else:
        middle = parameter_counts(adapter_for(shallow))
        shallow, report = prune(shallow, tokens, width, inplace=True, batch_size=batch_size, progress=progress,
                                calibration_info=calibration_info, device=device, dtype=dtype, holdout=holdout)
        p = report.parameters
        target = 1 - (1 - removed_share(before["attention_mlp"], middle["attention_mlp"])) * (1 - width.ratio)
        report.parameters = ParameterReport(before["total"], p.total_after, before["attention_mlp"],
                                            p.attention_mlp_after, target)
        report.time_s = {"depth": round(clock.laps["depth"], 3), **report.time_s,
                         "total": round(report.time_s["total"] + clock.laps["depth"], 3)}
    report.depth = record.to_json()
    return shallow, report
