"""The Hugging Face LLaMA layout: q/k/v/o_proj, SwiGLU gate/up/down_proj; the base of the llama-like families."""

from __future__ import annotations

import torch

from numprune.adapters.base import AttentionLayout, LayerPlan, UnitCosts
from numprune.adapters.stock import StockAdapter, sliced_rows
from numprune.modeling.families import LLAMA


class LlamaAdapter(StockAdapter):
    spec = LLAMA

    def attention_layout(self, layer_idx: int) -> AttentionLayout:
        attn = self.layers()[layer_idx].self_attn
        head_dim = attn.head_dim
        return AttentionLayout(attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim)

    def unit_costs(self, layer_idx: int) -> UnitCosts:
        layer = self.layers()[layer_idx]
        attn, mlp = layer.self_attn, layer.mlp
        hidden, hd = attn.q_proj.in_features, self.attention_layout(layer_idx).head_dim
        q_bias, kv_bias = int(attn.q_proj.bias is not None), int(attn.k_proj.bias is not None)
        mlp_bias = int(mlp.gate_proj.bias is not None)
        return UnitCosts(
            query_head=2 * hidden * hd + q_bias * hd,  # q rows (+ bias) and o columns
            kv_head=2 * (hidden * hd + kv_bias * hd),  # k and v rows (+ biases)
            channel=3 * hidden + mlp_bias * 2,  # gate and up rows (+ biases) and a down column
        )

    def kept_indices(self, layer_idx: int, plan: LayerPlan) -> dict[str, tuple[int, torch.Tensor]]:
        q, kv, ch = self.kept_channels(layer_idx, plan)
        kept = {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv,
                "mlp.gate_proj": ch, "mlp.up_proj": ch}
        return {**sliced_rows(self.layers()[layer_idx], self.prefix(layer_idx), kept),
                self.prefix(layer_idx) + "self_attn.o_proj.weight": (1, q),
                self.prefix(layer_idx) + "mlp.down_proj.weight": (1, ch)}

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        """LLaMA switches biases per block: all of q/k/v/o, all of gate/up/down (added ones start at zero)."""
        return {"attention_bias": bool(self.config.attention_bias) or attention,
                "mlp_bias": bool(getattr(self.config, "mlp_bias", False)) or mlp}


def attention_bias_fields(adapter: StockAdapter, attention: bool, mlp: bool) -> dict | None:
    """``stock_bias_fields`` of families with LLaMA's ``attention_bias`` and no MLP bias (Qwen3, Gemma)."""
    return None if mlp else {"attention_bias": bool(adapter.config.attention_bias) or attention}

