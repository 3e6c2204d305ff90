"""LlamaGen's layout: fused ``attention.wqkv`` (rows: queries, keys, values), ``attention.wo``, SwiGLU
``feed_forward.w1/w3/w2``. Pruned models stay LlamaGenForCausalLM with per-layer widths in the config.

The model itself (LlamaGen's own module names, 2D rotary positions) is numprune.modeling.llamagen.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from numprune.adapters import register
from numprune.adapters.base import Adapter, LayerPlan
from numprune.modeling.layout import KV, MLP, QUERY, LayerModules
from numprune.modeling.llamagen import LlamaGenConfig, LlamaGenForCausalLM
from numprune.modeling.per_layer import PER_LAYER_FIELDS


@register
class LlamaGenAdapter(Adapter):
    family = "llamagen"
    model_types = (LlamaGenConfig.model_type,)
    saved_classes = ((LlamaGenConfig, LlamaGenForCausalLM),)
    layers_path = "layers"
    heals_by_default = False  # healing an image generator was never validated: only when asked
    # wqkv has no bias; a bias on wo / w2 does not depend on how many heads or channels remain.
    modules = LayerModules("attention", (("attention.wqkv", (QUERY, KV, KV)), ("feed_forward.w1", (MLP,)),
                                         ("feed_forward.w3", (MLP,))), "attention.wo", "feed_forward.w2")

    def pruned_config(self, plans: list[LayerPlan], shifted: tuple[bool, bool] = (False, False)) -> PretrainedConfig:
        base = {k: v for k, v in self.config.to_dict().items()
                if k not in ("model_type", "architectures", "transformers_version", *PER_LAYER_FIELDS)}
        attention_bias, mlp_bias = self.output_biases(shifted)  # FLAP's bias compensation gives wo / w2 a bias
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
