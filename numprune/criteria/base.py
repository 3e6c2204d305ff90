"""What every criterion reads and returns: one layer's statistics and weights in, one score per unit out."""

from __future__ import annotations

from dataclasses import dataclass

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
