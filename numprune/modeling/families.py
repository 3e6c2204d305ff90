"""The transformers families numprune prunes, and their per-layer classes (see per_layer.py)."""

from __future__ import annotations

from torch import nn
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
                          OPTForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.opt.modeling_opt import OPTDecoderLayer
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer
from transformers.pytorch_utils import Conv1D

from numprune.modeling.layout import KV, LLAMA_MODULES, MLP, QUERY, LayerModules
from numprune.modeling.per_layer import Family, per_layer_classes


def narrowed(projection: nn.Module, out_features: int | None = None, in_features: int | None = None) -> nn.Module:
    """A fresh projection like ``projection`` (nn.Linear or Conv1D, bias or not) with new sizes."""
    if isinstance(projection, Conv1D):
        return Conv1D(out_features or projection.nf, in_features or projection.weight.shape[0])
    return nn.Linear(in_features or projection.in_features, out_features or projection.out_features,
                     bias=projection.bias is not None)


def _narrow_opt(layer: nn.Module, heads: int, head_dim: int) -> None:
    attn = layer.self_attn
    attn.num_heads = heads
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, narrowed(getattr(attn, name), out_features=heads * head_dim))
    attn.out_proj = narrowed(attn.out_proj, in_features=heads * head_dim)


def _narrow_gpt2(layer: nn.Module, heads: int, head_dim: int) -> None:
    attn = layer.attn
    attn.num_heads, attn.split_size = heads, heads * head_dim
    attn.c_attn = narrowed(attn.c_attn, out_features=3 * heads * head_dim)
    attn.c_proj = narrowed(attn.c_proj, in_features=heads * head_dim)


_LLAMA_LAYOUT = dict(layers="model.layers", modules=LLAMA_MODULES)
PHI3_MODULES = LayerModules("self_attn", (("self_attn.qkv_proj", (QUERY, KV, KV)), ("mlp.gate_up_proj", (MLP, MLP))),
                            "self_attn.o_proj", "mlp.down_proj")
OPT_MODULES = LayerModules("self_attn", (("self_attn.q_proj", (QUERY,)), ("self_attn.k_proj", (KV,)),
                                         ("self_attn.v_proj", (KV,)), ("fc1", (MLP,))), "self_attn.out_proj", "fc2")
GPT2_MODULES = LayerModules("attn", (("attn.c_attn", (QUERY, KV, KV)), ("mlp.c_fc", (MLP,))), "attn.c_proj",
                            "mlp.c_proj")

LLAMA = Family("Llama", "llama", LlamaConfig, LlamaForCausalLM, LlamaDecoderLayer, **_LLAMA_LAYOUT)
MISTRAL = Family("Mistral", "mistral", MistralConfig, MistralForCausalLM, MistralDecoderLayer, **_LLAMA_LAYOUT)
QWEN2 = Family("Qwen2", "qwen2", Qwen2Config, Qwen2ForCausalLM, Qwen2DecoderLayer, **_LLAMA_LAYOUT)
QWEN3 = Family("Qwen3", "qwen3", Qwen3Config, Qwen3ForCausalLM, Qwen3DecoderLayer, **_LLAMA_LAYOUT)
GEMMA2 = Family("Gemma2", "gemma2", Gemma2Config, Gemma2ForCausalLM, Gemma2DecoderLayer, **_LLAMA_LAYOUT)
GEMMA3_TEXT = Family("Gemma3Text", "gemma3_text", Gemma3TextConfig, Gemma3ForCausalLM, Gemma3DecoderLayer,
                     **_LLAMA_LAYOUT)
PHI3 = Family("Phi3", "phi3", Phi3Config, Phi3ForCausalLM, Phi3DecoderLayer, "model.layers", PHI3_MODULES)
OPT = Family("OPT", "opt", OPTConfig, OPTForCausalLM, OPTDecoderLayer, "model.decoder.layers", OPT_MODULES,
             width_field="ffn_dim", kv_field=None, narrow_attention=_narrow_opt)
GPT2 = Family("GPT2", "gpt2", GPT2Config, GPT2LMHeadModel, GPT2Block, "transformer.h", GPT2_MODULES,
              width_field="n_inner", heads_field="n_head", kv_field=None, narrow_attention=_narrow_gpt2)

FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3_TEXT, PHI3, OPT, GPT2)
PER_LAYER_CLASSES = {family.model_type: per_layer_classes(family) for family in FAMILIES}

# Named for ``numprune_llama`` folders saved before the other families existed, and for users.
NumpruneLlamaConfig, NumpruneLlamaForCausalLM = PER_LAYER_CLASSES["llama"]
