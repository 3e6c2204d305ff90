"""Mistral: the LLaMA layout without biases (an output-projection bias needs numprune's config)."""

from numprune.adapters.llama import LlamaAdapter
from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import MISTRAL


class MistralAdapter(LlamaAdapter):
    spec = MISTRAL
    stock_bias_fields = StockAdapter.stock_bias_fields
