"""The Hugging Face LLaMA layout (q/k/v/o_proj, SwiGLU gate/up/down_proj), shared by Mistral and Qwen2."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig

from numprune.adapters.base import Adapter, AttentionLayout, LayerPlan, UnitCosts, head_channels
from numprune.modeling import NumpruneLlamaConfig
from numprune.modeling.pruned_llama import PER_LAYER_FIELDS


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", NumpruneLlamaConfig.model_type)

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def attention_layout(self, layer_idx: int) -> AttentionLayout:
        attn = self.layers()[layer_idx].self_attn
        head_dim = attn.head_dim
        return AttentionLayout(attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim)

    def mlp_width(self, layer_idx: int) -> int:
        return self.layers()[layer_idx].mlp.down_proj.in_features

    def attention_output(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.o_proj

    def mlp_output(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    def unit_costs(self, layer_idx: int) -> UnitCosts:
        hidden, hd = self.config.hidden_size, self.attention_layout(layer_idx).head_dim
        attn_bias = int(bool(self.config.attention_bias))
        mlp_bias = int(bool(getattr(self.config, "mlp_bias", False)))
        return UnitCosts(
            query_head=2 * hidden * hd + attn_bias * hd,  # q rows (+ bias) and o columns
            kv_head=2 * (hidden * hd + attn_bias * hd),  # k and v rows (+ biases)
            channel=3 * hidden + mlp_bias * 2,  # gate and up rows (+ biases) and a down column
        )

    def kept_indices(self, layer_idx: int, plan: LayerPlan) -> dict[str, tuple[int, torch.Tensor]]:
        hd = self.attention_layout(layer_idx).head_dim
        q = head_channels(plan.heads, hd)
        kv = head_channels(plan.kv_heads, hd)
        ch = torch.tensor(plan.channels, dtype=torch.long)
        p = f"model.layers.{layer_idx}."
        kept = {
            p + "self_attn.q_proj.weight": (0, q),
            p + "self_attn.k_proj.weight": (0, kv),
            p + "self_attn.v_proj.weight": (0, kv),
            p + "self_attn.o_proj.weight": (1, q),
            p + "mlp.gate_proj.weight": (0, ch),
            p + "mlp.up_proj.weight": (0, ch),
            p + "mlp.down_proj.weight": (1, ch),
        }
        if self.config.attention_bias:
            kept |= {p + "self_attn.q_proj.bias": (0, q), p + "self_attn.k_proj.bias": (0, kv),
                     p + "self_attn.v_proj.bias": (0, kv)}
        if getattr(self.config, "mlp_bias", False):
            kept |= {p + "mlp.gate_proj.bias": (0, ch), p + "mlp.up_proj.bias": (0, ch)}
        return kept

    def pruned_config(self, plans: list[LayerPlan]) -> PretrainedConfig:
        base = {k: v for k, v in self.config.to_dict().items()
                if k not in ("model_type", "architectures", "transformers_version", "quantization_config",
                             *PER_LAYER_FIELDS)}
        base["head_dim"] = self.attention_layout(0).head_dim
        layers = self.layers()
        # A bias compensation gives o_proj / down_proj a bias; LLaMA configs switch biases per block.
        base["attention_bias"] = any(layer.self_attn.o_proj.bias is not None for layer in layers)
        base["mlp_bias"] = any(layer.mlp.down_proj.bias is not None for layer in layers)
        heads = [len(p.heads) for p in plans]
        kv_heads = [len(p.kv_heads) for p in plans]
        widths = [len(p.channels) for p in plans]
        uniform = len(set(heads)) == len(set(kv_heads)) == len(set(widths)) == 1
        if uniform and self.config.hidden_size % heads[0] == 0:
            # transformers' LlamaConfig insists that heads divide the hidden size.
            config = LlamaConfig(**{**base, "num_attention_heads": heads[0], "num_key_value_heads": kv_heads[0],
                                    "intermediate_size": widths[0]})
            config.architectures = ["LlamaForCausalLM"]
        else:
            config = NumpruneLlamaConfig(**{**base, "num_attention_heads": max(heads),
                                            "num_key_value_heads": max(kv_heads), "intermediate_size": max(widths),
                                            "layer_num_attention_heads": heads, "layer_num_key_value_heads": kv_heads,
                                            "layer_intermediate_sizes": widths})
            config.architectures = ["NumpruneLlamaForCausalLM"]
        return config

