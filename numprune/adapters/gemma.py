"""Gemma 2 and Gemma 3 (text): the LLaMA layout with head_dim apart from hidden / heads.

What else differs leaves head and channel slicing alone: extra norms around attention and MLP
(hidden-sized), q/k norms over head_dim (Gemma 3, shared by all heads), soft-capping, the
query_pre_attn_scalar scaling and the sliding/full layer types all stay as they are.
"""

from numprune.adapters.llama import attention_bias_fields
from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import GEMMA2, GEMMA3_TEXT


class Gemma2Adapter(StockAdapter):
    spec = GEMMA2
    stock_bias_fields = attention_bias_fields


class Gemma3TextAdapter(StockAdapter):
    spec = GEMMA3_TEXT
    stock_bias_fields = attention_bias_fields
