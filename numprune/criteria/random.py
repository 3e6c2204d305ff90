"""Random baseline: seeded uniform scores, a floor every real criterion must beat."""

from __future__ import annotations

import torch

from numprune.criteria.base import CriterionInputs, LayerScores


def score(inputs: CriterionInputs, *, seed: int = 0) -> LayerScores:
    generator = torch.Generator().manual_seed(seed * 100_003 + inputs.layer_idx)
    heads = torch.rand(inputs.layout.num_heads, generator=generator, dtype=torch.float64)
    channels = torch.rand(inputs.mlp_weight.shape[1], generator=generator, dtype=torch.float64)
    return LayerScores(heads=heads, channels=channels)
