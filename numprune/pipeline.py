"""The body of a pruning run, read top to bottom: check, select, compensate, report.

``numprune.prune`` (api.py, a loaded model) and ``numprune.prune_streaming`` (stream.py, a model
read from disk one layer at a time) are both these steps over a layer source (numprune.sources):

1. ``resolve`` and ``check_run``: the options (numprune.recipe) and everything the inputs' shapes
   decide, before any long work.
2. ``select``: calibrate (numprune.calibrate), score (numprune.criteria) and allocate
   (numprune.allocate), visiting each layer once; gives each layer's plan.
3. ``compensate``: refit each layer's output projections (numprune.compensate), visiting each
   layer once more; the source writes each layer narrowed with its fits (streamed), or ``shrink``
   builds the narrower model from the dense one and the fits (numprune.shrink).
4. ``build_report``: the typed report (numprune.report), timed by a ``Clock``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from numprune import compensate as compensation_registry
from numprune import distributed
from numprune.adapters import Adapter, LayerPlan, adapter_for
from numprune.adapters.base import projection_weight
from numprune.allocate import AUTO, AUTO_WEIGHTS, GUIDED, allocate, layer_guide
from numprune.calibrate import LayerStats, LayerStream, StatsStore
from numprune.criteria import CriterionInputs, LayerScores, get_method
from numprune.errors import NumpruneError
from numprune.precision import check_device, full_precision, model_device
from numprune.recipe import GUIDED_BY_COMPENSATION, POSITIVE_INT, PruneOptions, recipe_of
from numprune.report import Clock, ComputeRecord, ParameterReport, PruneReport, parameter_counts, removed_share
from numprune.sources import LayerSource

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# round_to is refused when the widths it rounds to would move the removed share by more than this
# fraction of the target (e.g. 8.9% removed against 30%).
ROUND_TO_TOLERANCE = 0.5


@dataclass
class Compute:
    """Where and how the layer passes run; none of it changes the result beyond float rounding."""

    batch_size: int = 8
    progress: bool = True
    device: torch.device | str | None = None  # None: the model's own (numprune.precision.model_device)
    dtype: torch.dtype | None = None  # None: the weights' own

    def __post_init__(self):
        POSITIVE_INT.check("batch size", self.batch_size)
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise NumpruneError(f"dtype must be a torch floating dtype such as torch.bfloat16, got {self.dtype!r}")
        self.device = check_device(self.device)

    def where(self, adapter: Adapter) -> torch.device:
        """The device the layer passes run on: the one asked for, else the model's own."""
        return self.device if self.device is not None else model_device(adapter.model)

    def stream(self, adapter: Adapter, tokens: torch.Tensor) -> LayerStream:
        """This process's share of ``tokens`` streamed into the first layer, statistics summed over processes."""
        return LayerStream(adapter.model, adapter, distributed.shard(tokens), self.batch_size, self.where(adapter),
                           self.dtype, distributed.reducer())

    def describe(self, adapter: Adapter, streaming: bool = False) -> ComputeRecord:
        dtype = self.dtype or next(p for p in adapter.model.parameters()).dtype
        return ComputeRecord(str(self.where(adapter)), str(dtype).removeprefix("torch."), distributed.world().size,
                             streaming)


# 1. Checks, before any long work.

def resolve(recipe: PruneOptions | None, options: dict, tokens, stats) -> PruneOptions:
    """The run's recipe (numprune.recipe.recipe_of); the calibration tokens are there when needed. Healing is
    decided here where the model cannot matter: never by default after depth pruning, nor without tokens to train
    on (unless asked: then refused)."""
    opts = recipe_of(recipe, options)
    if opts.depth or tokens is None:
        opts = opts.decide_healing(False)
    if tokens is None:
        if stats is None:
            raise NumpruneError("calibration tokens are needed")
        for needed, what in ((opts.compensation_stats == "sequential", "sequential compensation statistics"),
                             (opts.heal, "healing")):
            if needed:
                raise NumpruneError(f"calibration tokens are needed for {what}")
    return opts


def healing_for(adapter: Adapter, opts: PruneOptions) -> PruneOptions:
    """``opts`` with healing decided: the method's own where the family heals by default, else only where asked."""
    return opts.decide_healing(adapter.heals_by_default)


def check_tokens(adapter: Adapter, tokens) -> None:
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
    check_tokens(adapter, tokens)
    if stats is not None:
        _check_stats(adapter, stats)
    _check_undamped_solves(adapter, stats[0].attention.count if stats is not None else int(tokens.numel()), opts)
    layers = range(adapter.num_layers())
    equal = [LayerScores(torch.zeros(adapter.attention_layout(i).num_heads, dtype=torch.float64, device="cpu"),
                         torch.zeros(adapter.mlp_width(i), dtype=torch.float64, device="cpu")) for i in layers]
    # A guided allocation ranks across layers like the global one: the same shapes decide whether it exists.
    mode = "global" if opts.allocation in (*GUIDED, AUTO) else opts.allocation
    _check_rounding(adapter, allocate(adapter, equal, opts.ratio, mode, opts.gqa_unit, opts.round_to), opts)


def _check_rounding(adapter: Adapter, plans: list[LayerPlan], opts: PruneOptions) -> None:
    """Refuse ``round_to`` when the widths it rounds to move the removed share too far from the target: on the
    dry run before any work, and on the real plan (whose widths depend on the scores) before anything is written."""
    if opts.round_to == 1:
        return
    layers = range(adapter.num_layers())
    achieved = removed_share(sum(adapter.prunable_parameters(i) for i in layers),
                             sum(adapter.prunable_parameters(i, plans[i]) for i in layers))
    if abs(achieved - opts.ratio) > ROUND_TO_TOLERANCE * opts.ratio:
        raise NumpruneError(f"round_to {opts.round_to} would remove {achieved:.1%} of the attention+MLP parameters "
                            f"against a target of {opts.ratio:.1%}; choose a smaller multiple")


def _check_undamped_solves(adapter: Adapter, count: int, opts: PruneOptions) -> None:
    """At damping 0 a compensation's solve needs more calibration tokens than the projection has inputs: the
    covariance of D inputs over fewer tokens is singular (centred, over D tokens or fewer), and which kept inputs
    it would be solved on is known only after calibration and scoring. Refused before either, naming the first
    projection with too few."""
    names = {opts.compensation} | ({opts.allocation_compensation} if opts.allocation == GUIDED_BY_COMPENSATION else set())
    if opts.compensation_damp > 0:
        return
    for name in sorted(n for n in names if compensation_registry.REGISTRY[n].options is compensation_registry.Damped):
        for i, layer in enumerate(adapter.layers()):
            for path in (adapter.modules.attention_output, adapter.modules.mlp_output):
                width = projection_weight(layer.get_submodule(path)).shape[1]
                needed = width + (name == "affine")  # the centred covariance loses one rank to the mean
                if count < needed:
                    raise NumpruneError(f"{name} compensation at damping 0 needs at least {needed} calibration tokens "
                                        f"for layer {i}'s {path} ({width} inputs, whose covariance is singular with "
                                        f"fewer); got {count}: calibrate on more tokens or give a damping > 0")


def _check_stats(adapter: Adapter, stats) -> None:
    """Statistics from ``calibrate`` on a model of this shape (one entry per layer, matching widths)."""
    if not isinstance(stats, Sequence) or not all(isinstance(s, LayerStats) for s in stats):
        raise NumpruneError(f"stats must be what calibrate returns (one LayerStats per layer), got "
                            f"{type(stats).__name__}")
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


# 2. Select: calibrate, score and allocate.

def select(source: LayerSource, tokens: torch.Tensor | None, stats: Sequence[LayerStats] | None, opts: PruneOptions,
           compute: Compute, clock: Clock) -> tuple[list[LayerPlan] | dict[float, list[LayerPlan]], Sequence[LayerStats]]:
    """Calibrate (unless ``stats`` are given), score and allocate, visiting each layer once.

    The ``auto`` allocation gets every candidate's plans instead, by blend weight (numprune.auto chooses)."""
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
    # One visit per layer does both stages (scoring takes most of it), so the bar names both.
    for i in tqdm(range(adapter.num_layers()), desc="calibrating and scoring" if stream else "scoring", unit="layer",
                  disable=not compute.progress):
        with source.layer(i) as layer:
            if stream is not None:  # scored from memory; the store keeps it for compensation
                with clock.timed("calibration"), full_precision():
                    layer_stats = stream.run(layer, collect=True, advance=True)
                    stats.append(layer_stats)
            else:
                layer_stats = stats[i]
            with clock.timed("scoring"), full_precision(), _solvable(i, "scoring"):
                inputs = criterion_inputs(adapter, i, layer, layer_stats, opts.ratio)
                scores.append(criterion(inputs, **opts.score_options))
                mode = "blend" if opts.allocation == AUTO else opts.allocation  # auto's candidates are blends
                guides.append(layer_guide(mode, adapter, inputs, scores[-1], opts.allocation_compensation,
                                          opts.compensation_options(opts.allocation_compensation), opts.gqa_unit))
    del stream
    runs = {w: ("blend", w) for w in AUTO_WEIGHTS} if opts.allocation == AUTO else {None: (opts.allocation,
                                                                                           opts.blend_weight)}
    candidates = {}
    with clock.timed("scoring"):  # ranks and counts only: the float work was in the scores and guides
        for key, (mode, weight) in runs.items():
            candidates[key] = allocate(adapter, scores, opts.ratio, mode, opts.gqa_unit, opts.round_to, guides, weight)
    for plans in candidates.values():
        _check_rounding(adapter, plans, opts)
        distributed.agree("the allocation", [asdict(p) for p in plans])
    return (candidates if opts.allocation == AUTO else candidates[None]), stats


@contextmanager
def _solvable(i: int, stage: str) -> Iterator[None]:
    """A factorisation that fails on layer ``i``'s statistics (singular at damping 0: tokens that do not vary, a
    channel never active) as one line that says what to change, not a linear-algebra traceback."""
    try:
        yield
    except torch.linalg.LinAlgError as e:
        reason = str(e).splitlines()[0]
        raise NumpruneError(f"{stage} of layer {i} failed: its calibration statistics are singular ({reason}); "
                            "give a damping > 0 or calibrate on more varied text") from None


def criterion_inputs(adapter: Adapter, i: int, layer: nn.Module, stats: LayerStats, ratio: float) -> CriterionInputs:
    """What a criterion scores layer ``i`` from: its statistics and the weights of ``layer``, copied to where the
    statistics are (the criteria compute in float64 there) in the dtype the source holds them in."""
    where = stats.attention.gram.device
    return CriterionInputs(i, stats, projection_weight(adapter.attention_output(layer)).detach().to(where),
                           projection_weight(adapter.mlp_output(layer)).detach().to(where), adapter.attention_layout(i),
                           ratio)


# 3. Compensate: refit.

def compensate(source: LayerSource, plans: list[LayerPlan], stats: Sequence[LayerStats], tokens,
               opts: PruneOptions, compute: Compute, clock: Clock) -> None:
    """Fit every layer's output projections to what its plan keeps; ``source.done`` receives each layer's fits.

    The dense model stays as it is: the fits are applied while the narrower model is built (numprune.shrink).
    ``dense`` statistics come from the unpruned model (the calibration pass); ``sequential`` ones
    are re-collected with the layers upstream already pruned and compensated (each layer computes
    what its fits make of it while the next layer's inputs are computed), so each layer corrects
    the drift of those before it.
    """
    adapter = source.adapter
    stream = None
    compensation, options = compensation_registry.REGISTRY[opts.compensation], opts.compensation_options()
    if opts.compensation_stats == "sequential":
        with source.inputs(), clock.timed("compensation"):
            stream = compute.stream(adapter, tokens)
    for i in tqdm(range(adapter.num_layers()), desc="compensating", unit="layer", disable=not compute.progress):
        with source.layer(i) as layer:
            # statistics and fits where the statistics are
            with clock.timed("compensation"), full_precision(), _solvable(i, "compensation"):
                if not compensation.needs:
                    layer_stats = None
                elif stream is None:
                    layer_stats = stats[i]
                else:
                    layer_stats = stream.run(layer, collect=True, advance=False)
                kept = adapter.kept_inputs(i, plans[i])
                outputs = (adapter.attention_output(layer), adapter.mlp_output(layer))
                parts = (layer_stats.attention, layer_stats.mlp) if layer_stats is not None else (None, None)
                fits = tuple(compensation.fit(weight.to(s.gram.device) if s is not None else weight, s, keep, options)
                             for weight, keep, s in zip((projection_weight(o).detach() for o in outputs), kept, parts))
                if stream is not None:
                    with compensation_registry.applied(outputs, kept, fits):
                        stream.run(layer, collect=False, advance=True)
            with clock.timed("surgery"):
                source.done(i, layer, plans[i], fits)


# 4. Report.

def build_report(opts: PruneOptions, tokens, calibration_info: dict | None, before: dict, pruned: nn.Module,
                 plans: list[LayerPlan], clock: Clock, compute: ComputeRecord) -> PruneReport:
    """The run's report: options, parameters, per-layer widths, time and memory."""
    calibration = {**(calibration_info or {})}
    if tokens is not None:
        calibration["tokens"] = int(tokens.numel())
        if "calibration" in clock.laps:
            calibration["tokens_per_s"] = round(tokens.numel() / max(clock.laps["calibration"], 1e-9), 1)
    after = parameter_counts(adapter_for(pruned))
    parameters = ParameterReport(before["total"], after["total"], before["attention_mlp"], after["attention_mlp"],
                                 opts.ratio)
    return PruneReport(opts.method, opts, calibration, parameters, plans, type(pruned.config).__name__,
                       not type(pruned.config).__module__.startswith("numprune"), compute, clock.times(),
                       clock.peak_rss, clock.peak_gpu)


def layers_only_report(opts: PruneOptions, tokens, calibration_info: dict | None, before: dict, shallow: nn.Module,
                       clock: Clock, compute: ComputeRecord) -> PruneReport:
    """The report of a run that removed layers only: every kept layer whole, method ``depth``."""
    kept = adapter_for(shallow)
    report = build_report(opts, tokens, calibration_info, before, shallow,
                          [kept.full_plan(i) for i in range(kept.num_layers())], clock, compute)
    report.method = "depth"
    return report
