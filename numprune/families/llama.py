"""LLaMA (and SmolLM2): ``model.layers``, q/k/v/o_proj, SwiGLU gate/up/down_proj: the layout most families share."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter
from numprune.modeling.per_layer import Family


@register
class LlamaAdapter(StockAdapter):
    spec = Family("Llama", "llama", LlamaConfig, LlamaForCausalLM, LlamaDecoderLayer)

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        """LLaMA switches biases per block: all of q/k/v/o, all of gate/up/down (added ones start at zero)."""
        return {"attention_bias": bool(self.config.attention_bias) or attention,
                "mlp_bias": bool(getattr(self.config, "mlp_bias", False)) or mlp}
