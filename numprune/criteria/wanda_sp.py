"""Wanda-sp (structured Wanda, as in FLAP's code): |W_ij| * ||x_j|| averaged over outputs.

A head scores the sum over its channels; the default allocation is uniform and there is no
compensation, as in the reference. Deviation: statistics come from the dense model rather than
from the already-pruned layers upstream, so one calibration serves every method.
"""

from __future__ import annotations

import torch

from numprune.criteria.base import CriterionInputs, LayerScores


def metric(second_moment_diag: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over output rows of |W_ij| * sqrt(E[x_j^2]) per input channel j."""
    return (weight.double().abs() * second_moment_diag.sqrt()).mean(0)


def score(inputs: CriterionInputs) -> LayerScores:
    attn = metric(inputs.stats.attention.second_moment.diagonal(), inputs.attention_weight)
    mlp = metric(inputs.stats.mlp.second_moment.diagonal(), inputs.mlp_weight)
    return LayerScores(heads=attn.reshape(inputs.layout.num_heads, -1).sum(1), channels=mlp)
