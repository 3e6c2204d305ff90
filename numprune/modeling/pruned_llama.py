"""LLaMA-layout model with per-layer head and MLP widths.

The decoder layers are the stock transformers ``LlamaDecoderLayer``; each one is built from a copy
of the config that carries that layer's own counts, so the forward pass is exactly transformers'.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


PER_LAYER_FIELDS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes")


@strict
class NumpruneLlamaConfig(LlamaConfig):
    """A LlamaConfig plus one head count, KV-head count and MLP width per decoder layer.

    ``head_dim`` is always explicit: after pruning, ``hidden_size / num_attention_heads`` no longer
    gives it. The top-level ``num_attention_heads`` etc. hold the largest per-layer value.
    """

    model_type = "numprune_llama"

    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        if self.layer_num_attention_heads is None:
            self.layer_num_attention_heads = [self.num_attention_heads] * n
        if self.layer_num_key_value_heads is None:
            kv = self.num_key_value_heads or self.num_attention_heads
            self.layer_num_key_value_heads = [kv] * n
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [self.intermediate_size] * n
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Per-layer counts replace the stock rule that heads divide the hidden size."""
        lists = (self.layer_num_attention_heads, self.layer_num_key_value_heads, self.layer_intermediate_sizes)
        if any(len(x) != self.num_hidden_layers for x in lists):
            raise ValueError("per-layer counts must have one entry per decoder layer")
        for i, (heads, kv, inter) in enumerate(zip(*lists)):
            if heads < 1 or kv < 1 or inter < 1 or heads % kv:
                raise ValueError(f"layer {i}: {heads} heads over {kv} KV heads, {inter} MLP channels is not a valid layer")

    def layer_config(self, layer_idx: int) -> LlamaConfig:
        """A stock LlamaConfig with this layer's counts, for building its decoder layer."""
        fields = self.to_dict()
        for key in (*PER_LAYER_FIELDS, "model_type", "architectures", "auto_map", "transformers_version"):
            fields.pop(key, None)
        heads = self.layer_num_attention_heads[layer_idx]
        kv_heads = self.layer_num_key_value_heads[layer_idx]
        fields["intermediate_size"] = self.layer_intermediate_sizes[layer_idx]
        # Built with one head, then given this layer's counts: the stock validation would demand
        # that the head count divide the hidden size, which pruning does not keep.
        config = LlamaConfig(**{**fields, "num_attention_heads": 1, "num_key_value_heads": 1})
        config.num_attention_heads = heads
        config.num_key_value_heads = kv_heads
        config._attn_implementation = self._attn_implementation
        return config


class NumpruneLlamaModel(LlamaModel):
    config_class = NumpruneLlamaConfig

    def __init__(self, config: NumpruneLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config.layer_config(i), i) for i in range(config.num_hidden_layers)
        )
        self.post_init()


class NumpruneLlamaForCausalLM(LlamaForCausalLM):
    config_class = NumpruneLlamaConfig

    def __init__(self, config: NumpruneLlamaConfig):
        super().__init__(config)
        self.model = NumpruneLlamaModel(config)
        self.post_init()
