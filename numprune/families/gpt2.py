"""GPT-2: ``transformer.h``, transformers' ``Conv1D`` projections (weights stored [in, out], always a bias),
fused ``attn.c_attn`` columns [q | k | v], ``attn.c_proj``, a GELU MLP ``mlp.c_fc`` / ``mlp.c_proj``.

The MLP is not gated: a channel is one c_fc column (+ bias) and one c_proj row. GPT-2 derives
head_dim from hidden / heads, so a result with fewer heads needs numprune's config, uniform or not.
"""

from __future__ import annotations

from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter
from numprune.modeling.layout import KV, MLP, QUERY, LayerModules
from numprune.modeling.per_layer import Family, narrowed

MODULES = LayerModules("attn", (("attn.c_attn", (QUERY, KV, KV)), ("mlp.c_fc", (MLP,))), "attn.c_proj", "mlp.c_proj")


def narrow_attention(layer: nn.Module, heads: int, head_dim: int) -> None:
    """Cut a block built with the unpruned head count to ``heads`` heads."""
    attn = layer.attn
    attn.num_heads, attn.split_size = heads, heads * head_dim
    attn.c_attn = narrowed(attn.c_attn, out_features=3 * heads * head_dim)
    attn.c_proj = narrowed(attn.c_proj, in_features=heads * head_dim)


@register
class GPT2Adapter(StockAdapter):
    spec = Family("GPT2", "gpt2", GPT2Config, GPT2LMHeadModel, GPT2Block, "transformer.h", MODULES,
                  width_field="n_inner", heads_field="n_head", kv_field=None, narrow_attention=narrow_attention)
    learned_positions = True

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        return {}  # every Conv1D has a bias already
