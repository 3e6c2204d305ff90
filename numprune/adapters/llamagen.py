"""LlamaGen's layout: fused ``attention.wqkv`` (rows: queries, keys, values), ``attention.wo``, SwiGLU
``feed_forward.w1/w3/w2``. Pruned models stay LlamaGenForCausalLM with per-layer widths in the config."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from numprune.adapters.base import Adapter, AttentionLayout, LayerPlan, UnitCosts
from numprune.modeling.llamagen import LlamaGenConfig
from numprune.modeling.per_layer import PER_LAYER_FIELDS


class LlamaGenAdapter(Adapter):
    family = "llamagen"
    model_types = (LlamaGenConfig.model_type,)

    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def attention_layout(self, layer_idx: int) -> AttentionLayout:
        attn = self.layers()[layer_idx].attention
        return AttentionLayout(attn.n_head, attn.n_kv_head, attn.head_dim)

    def mlp_width(self, layer_idx: int) -> int:
        return self.layers()[layer_idx].feed_forward.w2.in_features

    def attention_output(self, layer: nn.Module) -> nn.Linear:
        return layer.attention.wo

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        return layer.feed_forward.w2

    def unit_costs(self, layer_idx: int) -> UnitCosts:
        hidden, hd = self.config.hidden_size, self.attention_layout(layer_idx).head_dim
        # wqkv has no bias; a bias on wo / w2 does not depend on how many heads or channels remain.
        return UnitCosts(query_head=2 * hidden * hd, kv_head=2 * hidden * hd, channel=3 * hidden)

    def kept_indices(self, layer_idx: int, plan: LayerPlan) -> dict[str, tuple[int, torch.Tensor]]:
        q, _, ch = self.kept_channels(layer_idx, plan)
        p = f"layers.{layer_idx}."
        return {
            p + "attention.wqkv.weight": (0, self.kept_qkv(layer_idx, plan)),
            p + "attention.wo.weight": (1, q),
            p + "feed_forward.w1.weight": (0, ch),
            p + "feed_forward.w3.weight": (0, ch),
            p + "feed_forward.w2.weight": (1, ch),
        }

    def pruned_config(self, plans: list[LayerPlan]) -> PretrainedConfig:
        base = {k: v for k, v in self.config.to_dict().items()
                if k not in ("model_type", "architectures", "transformers_version", *PER_LAYER_FIELDS)}
        attention_bias, mlp_bias = self.output_biases()  # FLAP's bias compensation gives wo / w2 a bias
        heads = [len(p.heads) for p in plans]
        kv_heads = [len(p.kv_heads) for p in plans]
        widths = [len(p.channels) for p in plans]
        config = LlamaGenConfig(**{
            **base, "num_attention_heads": max(heads), "num_key_value_heads": max(kv_heads),
            "intermediate_size": max(widths), "head_dim": self.attention_layout(0).head_dim,
            "attention_output_bias": attention_bias, "mlp_output_bias": mlp_bias,
            "layer_num_attention_heads": heads, "layer_num_key_value_heads": kv_heads,
            "layer_intermediate_sizes": widths})
        config.architectures = ["LlamaGenForCausalLM"]
        return config
