"""Criteria: what to remove. Each turns one layer's statistics and weights into scores.

Every criterion has the same signature, ``score(inputs: CriterionInputs, **options) -> LayerScores``,
and lower scores are removed first. How units are removed (allocation, compensation, surgery)
is none of a criterion's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from numprune.adapters import AttentionLayout
from numprune.calibrate import LayerStats


@dataclass
class CriterionInputs:
    layer_idx: int
    stats: LayerStats
    attention_weight: torch.Tensor  # output projection of attention, [hidden, heads * head_dim]
    mlp_weight: torch.Tensor  # output projection of the MLP, [hidden, channels]
    layout: AttentionLayout
    ratio: float  # the global fraction of parameters to remove


@dataclass
class LayerScores:
    heads: torch.Tensor  # float64 [num_heads]: one score per query head
    channels: torch.Tensor  # float64 [mlp channels]


Criterion = Callable[..., LayerScores]


@dataclass(frozen=True)
class Method:
    """A criterion with the allocation and compensation its own paper uses (the defaults)."""

    criterion: Criterion
    allocation: str
    compensation: str
    compensation_damp: float = 0.01


def methods() -> dict[str, Method]:
    from numprune.criteria import flap, magnitude, numerical, random, wanda_sp

    return {
        "numerical": Method(numerical.score, "global", "least-squares"),
        "numerical-unit": Method(numerical.unit_score, "global", "least-squares"),
        "flap": Method(flap.score, "global", "bias"),
        "wanda-sp": Method(wanda_sp.score, "uniform", "none"),
        "magnitude": Method(magnitude.score, "uniform", "none"),
        "random": Method(random.score, "uniform", "none"),
    }


def get_method(name: str) -> Method:
    from numprune.errors import NumpruneError

    table = methods()
    if name not in table:
        raise NumpruneError(f"unknown method {name!r}; available: {', '.join(table)}")
    return table[name]
