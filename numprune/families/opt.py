"""OPT: ``model.decoder.layers``, q/k/v/out_proj with biases, a ReLU MLP fc1/fc2 with biases, no GQA.

The MLP is not gated: a channel is one fc1 row (+ bias) and one fc2 column. OPT derives head_dim
from hidden / heads, so a result with fewer heads needs numprune's config, uniform or not.
"""

from __future__ import annotations

from torch import nn
from transformers import OPTConfig, OPTForCausalLM
from transformers.models.opt.modeling_opt import OPTDecoderLayer

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter
from numprune.modeling.layout import KV, MLP, QUERY, LayerModules
from numprune.modeling.per_layer import Family, narrowed

MODULES = LayerModules("self_attn", (("self_attn.q_proj", (QUERY,)), ("self_attn.k_proj", (KV,)),
                                     ("self_attn.v_proj", (KV,)), ("fc1", (MLP,))), "self_attn.out_proj", "fc2")


def narrow_attention(layer: nn.Module, heads: int, head_dim: int) -> None:
    """Cut a decoder layer built with the unpruned head count to ``heads`` heads."""
    attn = layer.self_attn
    attn.num_heads = heads
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, narrowed(getattr(attn, name), out_features=heads * head_dim))
    attn.out_proj = narrowed(attn.out_proj, in_features=heads * head_dim)


@register
class OPTAdapter(StockAdapter):
    spec = Family("OPT", "opt", OPTConfig, OPTForCausalLM, OPTDecoderLayer, "model.decoder.layers", MODULES,
                  width_field="ffn_dim", kv_field=None, narrow_attention=narrow_attention)
    learned_positions = True

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        return {"enable_bias": bool(self.config.enable_bias) or attention or mlp}
