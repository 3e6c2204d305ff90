"""Phi-3: the LLaMA layout with fused projections, ``qkv_proj`` rows [q; k; v] and ``gate_up_proj`` rows [gate; up].

No bias switches: an output-projection bias needs numprune's config.
"""

from __future__ import annotations

from transformers import Phi3Config, Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

from numprune.adapters import register
from numprune.adapters.stock import StockAdapter
from numprune.modeling.layout import KV, MLP, QUERY, LayerModules
from numprune.modeling.per_layer import Family

MODULES = LayerModules("self_attn", (("self_attn.qkv_proj", (QUERY, KV, KV)), ("mlp.gate_up_proj", (MLP, MLP))),
                       "self_attn.o_proj", "mlp.down_proj")


@register
class Phi3Adapter(StockAdapter):
    spec = Family("Phi3", "phi3", Phi3Config, Phi3ForCausalLM, Phi3DecoderLayer, modules=MODULES)
