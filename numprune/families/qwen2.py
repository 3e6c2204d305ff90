"""Qwen2: the LLaMA layout with q/k/v biases (always on, sliced with their heads) and none on o_proj."""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter
from numprune.modeling.per_layer import Family


@register
class Qwen2Adapter(StockAdapter):
    spec = Family("Qwen2", "qwen2", Qwen2Config, Qwen2ForCausalLM, Qwen2DecoderLayer)
