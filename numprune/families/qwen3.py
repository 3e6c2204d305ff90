"""Qwen3: the LLaMA layout with an explicit head_dim and q/k RMSNorm over head_dim.

The norms' weights are shared by all heads (one per head channel), so they stay whole.
"""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter, attention_bias_fields
from numprune.modeling.per_layer import Family


@register
class Qwen3Adapter(StockAdapter):
    spec = Family("Qwen3", "qwen3", Qwen3Config, Qwen3ForCausalLM, Qwen3DecoderLayer)
    stock_bias_fields = attention_bias_fields
