"""Magnitude baseline (FLAP's mag-sp): the L2 norm of each input column of the output projections.

A head scores the sum of its columns' norms. Needs no calibration data for the score itself.
"""

from __future__ import annotations

from numprune.criteria.base import CriterionInputs, LayerScores


def score(inputs: CriterionInputs) -> LayerScores:
    attn = inputs.attention_weight.double().norm(dim=0)
    mlp = inputs.mlp_weight.double().norm(dim=0)
    return LayerScores(heads=attn.reshape(inputs.layout.num_heads, -1).sum(1), channels=mlp)
