"""Mistral: the LLaMA layout without biases (an output-projection bias needs numprune's config)."""

from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import MISTRAL


class MistralAdapter(StockAdapter):
    spec = MISTRAL
