"""GPT-2: ``transformer.h``, transformers' ``Conv1D`` projections (weights stored [in, out], always a bias),
fused ``attn.c_attn`` columns [q | k | v], ``attn.c_proj``, a GELU MLP ``mlp.c_fc`` / ``mlp.c_proj``.

The MLP is not gated: a channel is one c_fc column (+ bias) and one c_proj row. GPT-2 derives
head_dim from hidden / heads, so a result with fewer heads needs numprune's config, uniform or not.
"""

from __future__ import annotations

import torch

from numprune.adapters.base import AttentionLayout, LayerPlan, UnitCosts
from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import GPT2


class GPT2Adapter(StockAdapter):
    spec = GPT2

    def attention_layout(self, layer_idx: int) -> AttentionLayout:
        attn = self.layers()[layer_idx].attn
        heads = attn.c_proj.weight.shape[0] // attn.head_dim
        return AttentionLayout(heads, heads, attn.head_dim)

    def unit_costs(self, layer_idx: int) -> UnitCosts:
        hidden, hd = self.config.hidden_size, self.attention_layout(layer_idx).head_dim
        return UnitCosts(query_head=hd * (hidden + 1) + hd * hidden,  # q columns + bias, c_proj rows
                         kv_head=2 * hd * (hidden + 1),  # k and v columns + biases
                         channel=2 * hidden + 1)  # a c_fc column + bias and a c_proj row

    def kept_indices(self, layer_idx: int, plan: LayerPlan) -> dict[str, tuple[int, torch.Tensor]]:
        q, _, ch = self.kept_channels(layer_idx, plan)
        qkv = self.kept_qkv(layer_idx, plan)
        p = self.prefix(layer_idx)
        return {p + "attn.c_attn.weight": (1, qkv), p + "attn.c_attn.bias": (0, qkv), p + "attn.c_proj.weight": (0, q),
                p + "mlp.c_fc.weight": (1, ch), p + "mlp.c_fc.bias": (0, ch), p + "mlp.c_proj.weight": (0, ch)}

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        return {}  # every Conv1D has a bias already
