"""FLAP (An et al., AAAI 2024): fluctuation-based scores, standardised per layer.

WIFV metric of an input channel j of an output projection: Var_tokens(x_j) * ||W[:, j]||^2 (the
channel's fluctuation times the squared norm of the weight column it feeds). As in FLAP's code,
the attention metric is squared, both metrics are standardised over the layer's channels (z-score),
and a head scores the mean of its standardised channel metrics. FLAP's adaptive structure (AL-AM)
is numprune's ``global`` allocation with exact parameter costs, and its bias compensation is the
``bias`` compensation; both are this method's defaults. Deviation: statistics come from the dense
model (one calibration pass for every method) rather than FLAP's own layer loop, which is also dense.
"""

from __future__ import annotations

import torch

from numprune.criteria.base import CriterionInputs, LayerScores


def wifv(variance: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted input feature variance per input channel of ``weight`` ([out, D])."""
    return variance * weight.double().pow(2).sum(0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def score(inputs: CriterionInputs) -> LayerScores:
    attn = standardise(wifv(inputs.stats.attention.variance, inputs.attention_weight) ** 2)
    mlp = standardise(wifv(inputs.stats.mlp.variance, inputs.mlp_weight))
    heads = attn.reshape(inputs.layout.num_heads, inputs.layout.head_dim).mean(1)
    return LayerScores(heads=heads, channels=mlp)
