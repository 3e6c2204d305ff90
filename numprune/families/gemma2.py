"""Gemma 2: the LLaMA layout with head_dim apart from hidden / heads.

What else differs leaves head and channel slicing alone: extra norms around attention and MLP
(hidden-sized), soft-capping, the query_pre_attn_scalar scaling and the sliding/full layer types
all stay as they are.
"""

from __future__ import annotations

from transformers import Gemma2Config, Gemma2ForCausalLM
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter, attention_bias_fields
from numprune.modeling.per_layer import Family


@register
class Gemma2Adapter(StockAdapter):
    spec = Family("Gemma2", "gemma2", Gemma2Config, Gemma2ForCausalLM, Gemma2DecoderLayer)
    stock_bias_fields = attention_bias_fields
