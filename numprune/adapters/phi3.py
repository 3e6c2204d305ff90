"""Phi-3: the LLaMA layout with fused projections, ``qkv_proj`` rows [q; k; v] and ``gate_up_proj`` rows [gate; up]."""

from __future__ import annotations

import torch

from numprune.adapters.base import AttentionLayout, LayerPlan, UnitCosts, fused_indices
from numprune.adapters.llama import LlamaAdapter
from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import PHI3


class Phi3Adapter(LlamaAdapter):
    spec = PHI3
    stock_bias_fields = StockAdapter.stock_bias_fields  # Phi-3 has no bias switches

    def attention_layout(self, layer_idx: int) -> AttentionLayout:
        attn = self.layers()[layer_idx].self_attn
        hd = attn.head_dim
        heads = attn.o_proj.in_features // hd
        return AttentionLayout(heads, (attn.qkv_proj.out_features // hd - heads) // 2, hd)

    def unit_costs(self, layer_idx: int) -> UnitCosts:
        hidden, hd = self.config.hidden_size, self.attention_layout(layer_idx).head_dim
        return UnitCosts(query_head=2 * hidden * hd, kv_head=2 * hidden * hd, channel=3 * hidden)

    def kept_indices(self, layer_idx: int, plan: LayerPlan) -> dict[str, tuple[int, torch.Tensor]]:
        q, _, ch = self.kept_channels(layer_idx, plan)
        width = self.mlp_width(layer_idx)
        p = self.prefix(layer_idx)
        return {
            p + "self_attn.qkv_proj.weight": (0, self.kept_qkv(layer_idx, plan)),
            p + "self_attn.o_proj.weight": (1, q),
            p + "mlp.gate_up_proj.weight": (0, fused_indices((width, ch), (width, ch))),
            p + "mlp.down_proj.weight": (1, ch),
        }
