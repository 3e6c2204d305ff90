"""Qwen3: the LLaMA layout with an explicit head_dim and q/k RMSNorm over head_dim.

The norms' weights are shared by all heads (one per head channel), so they stay whole.
"""

from numprune.adapters.llama import attention_bias_fields
from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import QWEN3


class Qwen3Adapter(StockAdapter):
    spec = QWEN3
    stock_bias_fields = attention_bias_fields
