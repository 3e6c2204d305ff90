"""Qwen2: the LLaMA layout with q/k/v biases (always on, sliced with their heads) and none on o_proj."""

from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import QWEN2


class Qwen2Adapter(StockAdapter):
    spec = QWEN2
