"""Gemma 3 (text, e.g. Gemma 3 270M): Gemma 2's layout plus q/k norms over head_dim, shared by all heads.

As in Gemma 2, the extra norms, the scaling and the sliding/full layer types leave head and channel
slicing alone, and the q/k norms (one weight per head channel) stay whole.
"""

from __future__ import annotations

from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter, attention_bias_fields
from numprune.modeling.per_layer import Family


@register
class Gemma3TextAdapter(StockAdapter):
    spec = Family("Gemma3Text", "gemma3_text", Gemma3TextConfig, Gemma3ForCausalLM, Gemma3DecoderLayer)
    stock_bias_fields = attention_bias_fields
