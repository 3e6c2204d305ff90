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

Modes: ``global`` ranks the units of all layers together and removes the lowest-scoring ones until
the removed parameters reach ``ratio`` of all attention+MLP parameters (FLAP's cumulative
parameter count, which is what the paper's head weight alpha = 4 D_h / 3 stands for: each unit
counts with its exact parameter cost). ``uniform`` removes the same share from every layer: the
nearest whole number of attention units, then MLP channels to make up the layer's parameter share.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from numprune.adapters import Adapter, AttentionLayout, LayerPlan, UnitCosts
from numprune.criteria import LayerScores
from numprune.errors import NumpruneError

ALLOCATIONS = ("global", "uniform")
GQA_UNITS = ("query", "kv-group")


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


def allocate(adapter: Adapter, scores: list[LayerScores], ratio: float, mode: str = "global",
             gqa_unit: str = "query", round_to: int = 1) -> list[LayerPlan]:
    """Which units every layer keeps so that ``ratio`` of the attention+MLP parameters go.

    ``round_to`` > 1 then moves each layer's kept MLP width to the nearest multiple of it (the
    highest-scoring channels are the ones kept), for hardware-friendly matrix shapes; the
    achieved ratio, which the report states, moves with it.
    """
    if mode not in ALLOCATIONS:
        raise NumpruneError(f"unknown allocation {mode!r}; choose from {', '.join(ALLOCATIONS)}")
    if round_to < 1:
        raise NumpruneError(f"round-to must be a positive integer, got {round_to}")
    if gqa_unit not in GQA_UNITS:
        raise NumpruneError(f"unknown GQA unit {gqa_unit!r}; choose from {', '.join(GQA_UNITS)}")
    layers = []
    for i, s in enumerate(scores):
        if torch.isnan(s.heads).any() or torch.isnan(s.channels).any():
            raise NumpruneError(f"layer {i}: the criterion produced NaN scores (degenerate calibration data?)")
        costs = adapter.unit_costs(i)
        layers.append((attention_units(i, s.heads, adapter.attention_layout(i), costs, gqa_unit),
                       mlp_units(i, s.channels, costs)))
    removed = _global(adapter, layers, ratio) if mode == "global" else _uniform(adapter, layers, ratio)
    if round_to > 1:
        removed = _round_widths(layers, removed, round_to)
    return [_plan(adapter, i, [u for u in removed if u.layer == i]) for i in range(len(scores))]


def _global(adapter: Adapter, layers: list[tuple[list[Unit], list[Unit]]], ratio: float) -> list[Unit]:
    target = ratio * sum(adapter.prunable_parameters(i) for i in range(len(layers)))
    # The best unit of each kind in each layer is never a candidate: no layer is ever emptied.
    candidates = sorted((u for attn, mlp in layers for u in attn[:-1] + mlp[:-1]), key=Unit.key)
    removed, total = [], 0
    for unit in candidates:
        if total >= target:
            break
        removed.append(unit)
        total += unit.cost
    if total < target:
        raise NumpruneError(f"ratio {ratio} would leave a layer with no attention or no MLP channel")
    return removed


def _uniform(adapter: Adapter, layers: list[tuple[list[Unit], list[Unit]]], ratio: float) -> list[Unit]:
    removed = []
    for i, (attn, mlp) in enumerate(layers):
        n_attn = round(ratio * len(attn))
        attn_cost = sum(u.cost for u in attn[:n_attn])
        need = ratio * adapter.prunable_parameters(i) - attn_cost
        n_mlp = max(0, round(need / mlp[0].cost))
        if n_attn >= len(attn) or n_mlp >= len(mlp):
            raise NumpruneError(f"ratio {ratio} would leave layer {i} with no attention or no MLP channel")
        removed += attn[:n_attn] + mlp[:n_mlp]
    return removed


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
