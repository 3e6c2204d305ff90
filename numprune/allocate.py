"""Allocation: from per-layer scores to which heads and channels every layer keeps.

Pruning units and the GQA rule. A unit is what leaves together:
- an MLP channel (gate/up rows and a down column);
- for multi-head attention (one query head per KV head), a head with its K and V;
- for grouped-query attention, by default a *query slot*: one query head from every KV group (the
  lowest-scoring remaining one in each group), so all groups keep the same number of query heads,
  as transformers' ``repeat_kv`` requires, and every KV head stays. With ``gqa_unit="kv-group"`` a
  unit is instead a whole KV group: one KV head with all the query heads that use it.
A unit's score is the mean of its heads' scores. Every layer keeps at least one attention unit and
one MLP channel: a ratio that cannot be reached otherwise is an error, never an empty layer.

Modes. Allocation decides how many units each layer and kind loses; inside a layer and kind the
criterion's ranking always decides which (any criterion works under any allocation).
- ``global`` ranks the units of all layers together by the criterion's raw scores and removes the
  lowest-scoring ones until the removed parameters reach ``ratio`` of all attention+MLP parameters
  (FLAP's cumulative parameter count, which is what the paper's head weight alpha = 4 D_h / 3
  stands for: each unit counts with its exact parameter cost). A unit that would overshoot the
  target by an MLP channel's cost or more is passed over and the next-ranked units that fit close
  the gap, so the removed parameters end at most one MLP channel's cost above the target.
- ``uniform`` removes the same share from every layer: the nearest whole number of attention
  units, then the nearest whole number of MLP channels to make up the layer's parameter share.
  Halves round up, whatever the parity (``nearest``): 50% of 5 heads is 3 removed, of 7 heads 4.
- ``flap-widths`` takes the per-layer widths that ``global`` gives FLAP's standardised fluctuation
  scores (exact unit costs, as the ``flap`` method), then removes that many of the criterion's
  lowest-ranked units in each layer and kind (all units of one layer and kind cost the same, so the
  removed parameters are FLAP's to the parameter).
- ``blend`` moves from ``flap-widths`` toward ``global`` as the ratio grows: each layer and kind
  loses (1 - w) of the units ``flap-widths`` removes there plus w of those ``global`` removes, the
  whole removing ``ratio`` to within one MLP channel's cost (see ``blended``), and the criterion
  chooses which. FLAP's widths keep a model general at low ratios, where the global ranking
  overfits the calibration text; from about 30% on FLAP's widths cut too deep into some layers,
  and three quarters of the way to the global ranking's widths does better than either.
  The weight w is ``blend_weight`` if given, else ``blend_schedule(ratio)``, chosen on validation
  texts (docs/method.md, "The default method").
- ``compensated-error`` ranks by what removal costs after compensation: for each layer and kind,
  the calibration error the compensation leaves when the criterion's k lowest-ranked units go
  (every k, exactly; see compensate.removal_errors), divided by the layer's output energy
  E||W_attn x||^2 + E||W_mlp x||^2 so that layers compare on the same relative scale. Each unit
  then scores the marginal relative error per parameter of its step along the lower convex hull
  of that curve (so scores rise along the criterion's order) and ``global``'s exact-cost greedy
  removes the cheapest.

Each mode is one entry of ``REGISTRY`` (at the end of this file): how it picks the removed units,
and the per-layer guide it needs, if any. Adding a mode touches this file only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from numprune import compensate
from numprune.adapters import Adapter, AttentionLayout, LayerPlan, UnitCosts
from numprune.adapters.base import head_channels
from numprune.criteria import flap
from numprune.criteria.base import CriterionInputs, LayerScores
from numprune.errors import NumpruneError

GQA_UNITS = ("query", "kv-group")
# blend_schedule (chosen on validation texts, docs/method.md "The default method"): no share of the global
# ranking's widths up to a ratio of BLEND_FROM, BLEND_MAX of it from BLEND_TO on, linear between.
BLEND_FROM, BLEND_TO, BLEND_MAX = 0.25, 0.30, 0.75
# ``auto`` (numprune.auto) is no rule of its own: it measures blend at each of these weights on held-out text and
# keeps the best (0 is flap-widths, 1 is global, plan for plan), so it is not in REGISTRY.
AUTO, AUTO_WEIGHTS = "auto", (0.0, 0.25, 0.5, 0.75, 1.0)
AUTO_DESCRIPTION = "blend at weights 0 to 1, each measured on held-out text, the best kept"


@dataclass(frozen=True)
class Unit:
    layer: int
    position: int  # order inside its layer and kind; breaks score ties deterministically
    attention: bool
    heads: tuple[int, ...]  # query heads that leave with it (attention units)
    kv_heads: tuple[int, ...]  # KV heads that leave with it
    channel: int  # MLP channel (MLP units), -1 for attention units
    score: float
    cost: int  # parameters removed with it

    def key(self) -> tuple:
        return (self.score, self.layer, self.attention, self.position)


def attention_units(layer: int, head_scores: torch.Tensor, layout: AttentionLayout, costs: UnitCosts,
                    gqa_unit: str = "query") -> list[Unit]:
    """The attention units of one layer, in the order they would be removed inside it."""
    scores = head_scores.tolist()
    size = layout.group_size
    if size == 1 or gqa_unit == "kv-group":
        groups = [tuple(range(g * size, (g + 1) * size)) for g in range(layout.num_kv_heads)]
        units = [Unit(layer, 0, True, heads, (g,), -1, sum(scores[h] for h in heads) / size,
                      size * costs.query_head + costs.kv_head) for g, heads in enumerate(groups)]
    else:
        ranked = [sorted(range(g * size, (g + 1) * size), key=lambda h: (scores[h], h))
                  for g in range(layout.num_kv_heads)]
        slots = [tuple(sorted(group[r] for group in ranked)) for r in range(size)]
        units = [Unit(layer, 0, True, heads, (), -1, sum(scores[h] for h in heads) / len(heads),
                      len(heads) * costs.query_head) for heads in slots]
    units.sort(key=lambda u: (u.score, u.heads))
    return [replace(u, position=i) for i, u in enumerate(units)]


def mlp_units(layer: int, channel_scores: torch.Tensor, costs: UnitCosts) -> list[Unit]:
    scores = channel_scores.tolist()
    order = sorted(range(len(scores)), key=lambda c: (scores[c], c))
    return [Unit(layer, i, False, (), (), c, scores[c], costs.channel) for i, c in enumerate(order)]


def layer_guide(mode: str, adapter: Adapter, inputs: CriterionInputs, scores: LayerScores, compensation: str,
                compensation_options, gqa_unit: str = "query"):
    """What allocation ``mode`` needs of one layer besides the criterion's scores (None for most), computed
    while the layer is at hand: FLAP's scores for ``flap-widths``, error curves for ``compensated-error``."""
    guide = REGISTRY[mode].guide
    return guide(adapter, inputs, scores, compensation, compensation_options, gqa_unit) if guide else None


def blend_schedule(ratio: float) -> float:
    """The ``blend`` allocation's weight of the global ranking's widths at ``ratio``."""
    return BLEND_MAX * min(1.0, max(0.0, (ratio - BLEND_FROM) / (BLEND_TO - BLEND_FROM)))


@dataclass(frozen=True)
class Settings:
    """What an allocation mode may need besides the units: the GQA unit, and ``blend``'s weight."""

    gqa_unit: str = "query"
    blend_weight: float | None = None  # None: blend_schedule(ratio)


def allocate(adapter: Adapter, scores: list[LayerScores], ratio: float, mode: str = "global",
             gqa_unit: str = "query", round_to: int = 1, guides: list | None = None,
             blend_weight: float | None = None) -> list[LayerPlan]:
    """Which units every layer keeps so that ``ratio`` of the attention+MLP parameters go.

    ``guides`` holds each layer's ``layer_guide`` for the modes that need one. ``round_to`` > 1
    then moves each layer's kept MLP width to the nearest multiple of it (the highest-scoring
    channels are the ones kept), for hardware-friendly matrix shapes; the achieved ratio, which
    the report states, moves with it. The options come checked (numprune.recipe.PruneOptions).
    """
    layers = []
    for i, s in enumerate(scores):
        if torch.isnan(s.heads).any() or torch.isnan(s.channels).any():
            raise NumpruneError(f"layer {i}: the criterion produced NaN scores (degenerate calibration data?)")
        costs = adapter.unit_costs(i)
        layers.append((attention_units(i, s.heads, adapter.attention_layout(i), costs, gqa_unit),
                       mlp_units(i, s.channels, costs)))
    if mode in GUIDED and (guides is None or len(guides) != len(scores)):
        raise NumpruneError(f"the {mode} allocation needs a guide for every layer")
    removed = REGISTRY[mode].remove(adapter, layers, ratio, guides, Settings(gqa_unit, blend_weight))
    if round_to > 1:
        removed = _round_widths(layers, removed, round_to)
    return [_plan(adapter, i, [u for u in removed if u.layer == i]) for i in range(len(scores))]


def _global_ranking(adapter: Adapter, layers: list[tuple[list[Unit], list[Unit]]], ratio: float) -> list[Unit]:
    target = ratio * sum(adapter.prunable_parameters(i) for i in range(len(layers)))
    # The best unit of each kind in each layer is never a candidate: no layer is ever emptied.
    candidates = sorted((u for attn, mlp in layers for u in attn[:-1] + mlp[:-1]), key=Unit.key)
    return _until_target([], candidates, target, ratio)


def _until_target(removed: list[Unit], candidates: list[Unit], target: float, ratio: float) -> list[Unit]:
    """``removed`` and then ``candidates``, in their order, until the removed parameters reach ``target``.

    A unit that would overshoot the target by a cheapest candidate's cost or more (an attention unit
    when a few MLP channels are missing) is passed over, and the next candidates in order that fit
    close the gap: the removed parameters end within one cheapest unit (an MLP channel) above the
    target. Passed-over units are taken after all only where nothing cheaper is left to remove.
    """
    removed, total = list(removed), sum(u.cost for u in removed)
    cheapest = min((u.cost for u in candidates), default=0)
    passed = []
    for unit in candidates:
        if total >= target:
            break
        if total + unit.cost - target >= cheapest:
            passed.append(unit)
            continue
        removed.append(unit)
        total += unit.cost
    for unit in passed:
        if total >= target:
            break
        removed.append(unit)
        total += unit.cost
    if total < target:
        raise NumpruneError(f"ratio {ratio} would leave a layer with no attention or no MLP channel")
    return removed


def nearest(x: float) -> int:
    """The nearest whole number, halves up (Python's ``round`` takes halves to the even neighbour, so 50% of 5
    and of 7 heads would remove 2 and 4). ``x`` is first rounded to 9 decimals: 0.7 * 5 is 3.5, not 3.4999..."""
    return math.floor(round(x, 9) + 0.5)


def _uniform(adapter: Adapter, layers: list[tuple[list[Unit], list[Unit]]], ratio: float) -> list[Unit]:
    removed = []
    for i, (attn, mlp) in enumerate(layers):
        n_attn = nearest(ratio * len(attn))
        attn_cost = sum(u.cost for u in attn[:n_attn])
        need = ratio * adapter.prunable_parameters(i) - attn_cost
        n_mlp = max(0, nearest(need / mlp[0].cost))
        if n_attn >= len(attn) or n_mlp >= len(mlp):
            raise NumpruneError(f"ratio {ratio} would leave layer {i} with no attention or no MLP channel")
        removed += attn[:n_attn] + mlp[:n_mlp]
    return removed


def _counts(units: list[Unit]) -> Counter:
    """How many of ``units`` each layer and kind holds, keyed ``(layer, attention)``."""
    return Counter((u.layer, u.attention) for u in units)


def _same_widths(layers: list[tuple[list[Unit], list[Unit]]], reference: list[Unit]) -> list[Unit]:
    """As many of each layer's lowest-ranked units of each kind as ``reference`` removes there."""
    counts = _counts(reference)
    removed = []
    for i, (attn, mlp) in enumerate(layers):
        removed += attn[:counts[i, True]] + mlp[:counts[i, False]]
    return removed


def _hull_scored(units: list[Unit], errors: torch.Tensor) -> list[Unit]:
    """``units`` (in removal order) scored by the slope of the lower convex hull of (parameters removed, error).

    errors[k] is the error once the first k units are gone; the hull's slopes only rise, so the
    scores keep the units' order and a global greedy on them stays on each curve.
    """
    cost = [0]
    for u in units:
        cost.append(cost[-1] + u.cost)
    err = errors.tolist()
    hull = [0]
    for k in range(1, len(cost)):
        while len(hull) >= 2 and ((err[hull[-1]] - err[hull[-2]]) * (cost[k] - cost[hull[-2]])
                                  >= (err[k] - err[hull[-2]]) * (cost[hull[-1]] - cost[hull[-2]])):
            hull.pop()
        hull.append(k)
    scored = []
    for a, b in zip(hull, hull[1:]):
        slope = (err[b] - err[a]) / (cost[b] - cost[a])
        scored += [replace(u, score=slope) for u in units[a:b]]
    return scored


def _output_energy(weight: torch.Tensor, second_moment: torch.Tensor) -> torch.Tensor:
    """E||W x||^2 = tr(W E[x x^T] W^T)."""
    w = weight.double()
    return ((w @ second_moment.double()) * w).sum()


def _round_widths(layers: list[tuple[list[Unit], list[Unit]]], removed: list[Unit], multiple: int) -> list[Unit]:
    """Re-cut each layer's MLP so that the kept width is the nearest multiple of ``multiple``."""
    result = [u for u in removed if u.attention]
    for i, (_, mlp) in enumerate(layers):
        width = len(mlp) - sum(1 for u in removed if u.layer == i and not u.attention)
        width = min(len(mlp), max(multiple, multiple * round(width / multiple)))
        result += mlp[:len(mlp) - width]  # mlp is sorted by score: drop the lowest
    return result


def _plan(adapter: Adapter, layer: int, removed: list[Unit]) -> LayerPlan:
    full = adapter.full_plan(layer)
    heads = {h for u in removed for h in u.heads}
    kv_heads = {k for u in removed for k in u.kv_heads}
    channels = {u.channel for u in removed if not u.attention}
    return LayerPlan(tuple(h for h in full.heads if h not in heads),
                     tuple(k for k in full.kv_heads if k not in kv_heads),
                     tuple(c for c in full.channels if c not in channels))


def _flap_guide(adapter, inputs, scores, compensation, compensation_options, gqa_unit):
    return flap.score(inputs)


def _compensated_error_guide(adapter, inputs, scores, compensation, compensation_options, gqa_unit):
    """The relative error after removing the k lowest-ranked attention units and MLP channels, k = 0..n."""
    i, stats, layout = inputs.layer_idx, inputs.stats, inputs.layout
    costs = adapter.unit_costs(i)
    attn = attention_units(i, scores.heads, layout, costs, gqa_unit)
    mlp = mlp_units(i, scores.channels, costs)
    errors = compensate.REGISTRY[compensation].removal_errors
    where = stats.mlp.gram.device  # computed in float64 where the statistics are
    attn_order = torch.cat([head_channels(u.heads, layout.head_dim) for u in attn]).to(where)
    attn_errors = errors(inputs.attention_weight, stats.attention, attn_order, compensation_options)
    bounds = torch.tensor([0] + [len(u.heads) * layout.head_dim for u in attn], device=where).cumsum(0)
    mlp_errors = errors(inputs.mlp_weight, stats.mlp, torch.tensor([u.channel for u in mlp], device=where),
                        compensation_options)
    energy = sum(_output_energy(w, s.second_moment) for w, s in ((inputs.attention_weight, stats.attention),
                                                                  (inputs.mlp_weight, stats.mlp)))
    energy = energy.clamp_min(torch.finfo(torch.float64).tiny)
    return attn_errors[bounds] / energy, mlp_errors / energy


def _flap_removed(adapter, ratio, guides, gqa_unit) -> list[Unit]:
    """What the global ranking of FLAP's scores (the guides) removes."""
    flap_layers = [(attention_units(i, g.heads, adapter.attention_layout(i), adapter.unit_costs(i), gqa_unit),
                    mlp_units(i, g.channels, adapter.unit_costs(i))) for i, g in enumerate(guides)]
    return _global_ranking(adapter, flap_layers, ratio)


def _flap_widths(adapter, layers, ratio, guides, settings):
    return _same_widths(layers, _flap_removed(adapter, ratio, guides, settings.gqa_unit))


def _blend(adapter, layers, ratio, guides, settings):
    weight = blend_schedule(ratio) if settings.blend_weight is None else settings.blend_weight
    return blended(adapter, layers, ratio, _flap_removed(adapter, ratio, guides, settings.gqa_unit),
                   _global_ranking(adapter, layers, ratio), weight)


def blended(adapter: Adapter, layers: list[tuple[list[Unit], list[Unit]]], ratio: float,
            first: list[Unit], second: list[Unit], weight: float) -> list[Unit]:
    """Widths between two allocations: each layer and kind loses (1 - weight) of what ``first`` removes
    there plus ``weight`` of what ``second`` does, and the whole removes ``ratio`` to within one MLP
    channel's cost above it.

    The counts are real numbers; each layer and kind first loses the whole part of its count, then
    the parameters still missing come from the units just past those, the smallest overshoot of a
    layer's own count first (largest remainders, one unit at a time), passing over a unit that
    would overshoot the target by a channel's cost or more, as ``global`` does.
    """
    target = ratio * sum(adapter.prunable_parameters(i) for i in range(len(layers)))
    first_counts, second_counts = _counts(first), _counts(second)
    removed, candidates = [], []
    for i, (attn, mlp) in enumerate(layers):
        for kind, units in ((True, attn), (False, mlp)):
            count = (1 - weight) * first_counts[i, kind] + weight * second_counts[i, kind]
            whole = min(int(count + 1e-9), len(units) - 1)
            removed += units[:whole]
            # rounded, so that equal remainders tie exactly and the tie goes by layer and kind
            candidates += [(round(k - count, 9), i, kind, k, units[k]) for k in range(whole, len(units) - 1)]
    return _until_target(removed, [c[-1] for c in sorted(candidates, key=lambda c: c[:4])], target, ratio)


def _compensated_error(adapter, layers, ratio, guides, settings):
    return _global_ranking(adapter, [(_hull_scored(attn, a), _hull_scored(mlp, m))
                                     for (attn, mlp), (a, m) in zip(layers, guides)], ratio)


@dataclass(frozen=True)
class Allocation:
    """An allocation mode: how it picks the removed units, and what it needs of each layer (its guide)."""

    remove: Callable  # (adapter, layers' units in removal order, ratio, guides, Settings) -> removed units
    guide: Callable | None = None  # (adapter, CriterionInputs, LayerScores, compensation, its options, gqa_unit)
    description: str = ""  # one line: the command line's help lists it


REGISTRY: dict[str, Allocation] = {
    "global": Allocation(lambda adapter, layers, ratio, guides, settings: _global_ranking(adapter, layers, ratio),
                         description="the units of all layers ranked together"),
    "uniform": Allocation(lambda adapter, layers, ratio, guides, settings: _uniform(adapter, layers, ratio),
                          description="the same share from every layer"),
    "flap-widths": Allocation(_flap_widths, _flap_guide,
                              description="FLAP's per-layer widths, the method's ranking inside each layer"),
    "blend": Allocation(_blend, _flap_guide, description="between flap-widths and global, toward global as the "
                                                         "ratio grows"),
    "compensated-error": Allocation(_compensated_error, _compensated_error_guide,
                                    description="by the relative error left after compensation"),
}
ALLOCATIONS = tuple(REGISTRY)
GUIDED = tuple(name for name, a in REGISTRY.items() if a.guide)  # global rankings of what their guides compute
