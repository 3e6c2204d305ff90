"""Criteria: what to remove. Each turns one layer's statistics and weights into scores.

Every criterion has the same signature, ``score(inputs: CriterionInputs, **options) -> LayerScores``,
and lower scores are removed first. How units are removed (allocation, compensation, surgery)
is none of a criterion's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from numprune.criteria import flap, magnitude, numerical, random, wanda_sp
from numprune.criteria.base import CriterionInputs, LayerScores
from numprune.errors import NumpruneError

__all__ = ["Criterion", "CriterionInputs", "LayerScores", "Method", "get_method", "methods"]

Criterion = Callable[..., LayerScores]


@dataclass(frozen=True)
class Method:
    """A criterion with the allocation, compensation, score options and healing it prunes with by default."""

    criterion: Criterion
    allocation: str
    compensation: str
    compensation_damp: float = 0.01
    score_options: dict = field(default_factory=dict)
    heal: bool = False  # healed after pruning (numprune.heal) unless told otherwise
    description: str = ""  # one line: the command line's help lists it


def methods() -> dict[str, Method]:
    return {
        "numerical": Method(numerical.score, "global", "least-squares",
                            description="the paper's: Newton scores, global ranking, least-squares refit"),
        "numerical-unit": Method(numerical.unit_score, "global", "least-squares",
                                 description="numerical with one Newton variable per head"),
        # numprune's default: the paper's score and refit, per-layer widths from FLAP's toward the global
        # ranking's as the ratio grows, then healed (docs/method.md, "The default method")
        "numerical-robust": Method(numerical.score, "blend", "least-squares", heal=True,
                                   description="the paper's score and refit, per-layer widths blended from FLAP's "
                                               "toward the global ranking's as the ratio grows, then healed by "
                                               "distillation from the dense model"),
        "flap": Method(flap.score, "global", "bias", description="FLAP: fluctuation scores, bias compensation"),
        "wanda-sp": Method(wanda_sp.score, "uniform", "none", description="Wanda-SP: |W| times input norm, uniform"),
        "magnitude": Method(magnitude.score, "uniform", "none", description="column norms of the weights, uniform"),
        "random": Method(random.score, "uniform", "none", description="random scores (seeded), uniform"),
    }


def get_method(name: str) -> Method:
    table = methods()
    if name not in table:
        raise NumpruneError(f"unknown method {name!r}; available: {', '.join(table)}")
    return table[name]
