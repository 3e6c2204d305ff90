"""OPT: ``model.decoder.layers``, q/k/v/out_proj with biases, a ReLU MLP fc1/fc2 with biases, no GQA.

The MLP is not gated: a channel is one fc1 row (+ bias) and one fc2 column. OPT derives head_dim
from hidden / heads, so a result with fewer heads needs numprune's config, uniform or not.
"""

from __future__ import annotations

import torch

from numprune.adapters.base import AttentionLayout, LayerPlan, UnitCosts
from numprune.adapters.stock import StockAdapter, sliced_rows
from numprune.modeling.families import OPT


class OPTAdapter(StockAdapter):
    spec = OPT

    def attention_layout(self, layer_idx: int) -> AttentionLayout:
        attn = self.layers()[layer_idx].self_attn
        heads = attn.q_proj.out_features // attn.head_dim
        return AttentionLayout(heads, heads, attn.head_dim)

    def unit_costs(self, layer_idx: int) -> UnitCosts:
        layer = self.layers()[layer_idx]
        hidden, hd = layer.fc1.in_features, self.attention_layout(layer_idx).head_dim
        attn_bias, mlp_bias = int(layer.self_attn.q_proj.bias is not None), int(layer.fc1.bias is not None)
        return UnitCosts(query_head=hd * (hidden + attn_bias) + hd * hidden,  # q rows (+ bias), out_proj columns
                         kv_head=2 * hd * (hidden + attn_bias),  # k and v rows (+ biases)
                         channel=2 * hidden + mlp_bias)  # an fc1 row (+ bias) and an fc2 column

    def kept_indices(self, layer_idx: int, plan: LayerPlan) -> dict[str, tuple[int, torch.Tensor]]:
        q, kv, ch = self.kept_channels(layer_idx, plan)
        p = self.prefix(layer_idx)
        kept = {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv, "fc1": ch}
        return {**sliced_rows(self.layers()[layer_idx], p, kept),
                p + "self_attn.out_proj.weight": (1, q), p + "fc2.weight": (1, ch)}

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        return {"enable_bias": bool(self.config.enable_bias) or attention or mlp}
