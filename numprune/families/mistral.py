"""Mistral: the LLaMA layout without biases (an output-projection bias needs numprune's config)."""

from __future__ import annotations

from transformers import MistralConfig, MistralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter
from numprune.modeling.per_layer import Family


@register
class MistralAdapter(StockAdapter):
    spec = Family("Mistral", "mistral", MistralConfig, MistralForCausalLM, MistralDecoderLayer)
