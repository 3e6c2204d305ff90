"""The Hugging Face LLaMA layout: q/k/v/o_proj, SwiGLU gate/up/down_proj; the base of the llama-like families."""

from __future__ import annotations

from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import LLAMA


class LlamaAdapter(StockAdapter):
    spec = LLAMA

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        """LLaMA switches biases per block: all of q/k/v/o, all of gate/up/down (added ones start at zero)."""
        return {"attention_bias": bool(self.config.attention_bias) or attention,
                "mlp_bias": bool(getattr(self.config, "mlp_bias", False)) or mlp}


def attention_bias_fields(adapter: StockAdapter, attention: bool, mlp: bool) -> dict | None:
    """``stock_bias_fields`` of families with LLaMA's ``attention_bias`` and no MLP bias (Qwen3, Gemma)."""
    return None if mlp else {"attention_bias": bool(adapter.config.attention_bias) or attention}
