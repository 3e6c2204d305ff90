"""One mechanism for every family: a stock transformers model whose decoder layers differ in width.

``per_layer_classes(family)`` makes ``Numprune<Family>Config`` (the stock config plus one head
count, KV-head count and MLP width per layer, an explicit ``head_dim`` and two output-bias flags)
and ``Numprune<Family>ForCausalLM`` (the stock model whose decoder layers are rebuilt, each from a
copy of the config carrying that layer's counts). The layers are transformers' own classes, so
the forward pass is exactly transformers'.

Top-level counts: ``num_attention_heads`` etc. hold the largest per-layer value, except in
families whose attention derives ``head_dim = hidden / heads`` (OPT, GPT-2): there the top-level
head count stays the unpruned one (so the stock layer can be built) and each layer's attention is
then narrowed to its own heads (``Family.narrow_attention``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from numprune.modeling.layout import LLAMA_MODULES, LayerModules

PER_LAYER_FIELDS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_sizes")
BIAS_FIELDS = ("attention_output_bias", "mlp_output_bias")


@dataclass(frozen=True)
class Family:
    """Where a transformers family keeps what pruning changes (module paths, config field names).

    The layout defaults to LLaMA's, which most families share.
    """

    name: str  # class-name stem: Numprune<name>Config
    model_type: str  # the stock model_type; numprune's is numprune_<model_type>
    config_class: type[PretrainedConfig]
    causal_lm_class: type[PreTrainedModel]
    layer_class: type[nn.Module]  # built as layer_class(config, layer_idx)
    layers: str = "model.layers"  # path of the decoder layers' ModuleList in the causal LM
    modules: LayerModules = LLAMA_MODULES  # what pruning cuts inside a layer
    width_field: str = "intermediate_size"
    heads_field: str = "num_attention_heads"
    kv_field: str | None = "num_key_value_heads"  # None: no grouped-query attention
    # For attention that derives head_dim = hidden / heads: (layer, heads, head_dim) -> narrows it in place.
    narrow_attention: Callable[[nn.Module, int, int], None] | None = None

    @property
    def numprune_model_type(self) -> str:
        return f"numprune_{self.model_type}"


def narrowed(projection: nn.Module, out_features: int | None = None, in_features: int | None = None) -> nn.Module:
    """A fresh projection like ``projection`` (nn.Linear or Conv1D, bias or not) with new sizes.

    For ``Family.narrow_attention``: attention built with the unpruned head count, then cut to a layer's own.
    """
    if isinstance(projection, Conv1D):
        return Conv1D(out_features or projection.nf, in_features or projection.weight.shape[0])
    return nn.Linear(in_features or projection.in_features, out_features or projection.out_features,
                     bias=projection.bias is not None)


def per_layer_classes(family: Family) -> tuple[type[PretrainedConfig], type[PreTrainedModel]]:
    """The registered config and causal-LM classes of ``family`` with per-layer widths."""

    @strict
    class Config(family.config_class):
        __doc__ = f"""A {family.config_class.__name__} plus per-layer head counts, KV-head counts and MLP widths.

        ``head_dim`` is explicit (pruning breaks ``hidden / heads``); ``attention_output_bias`` /
        ``mlp_output_bias`` give the output projections a bias where the stock config cannot
        (FLAP's bias compensation). The per-layer lists default to the top-level values.
        """

        model_type = family.numprune_model_type

        head_dim: int | None = None
        layer_num_attention_heads: list[int] | None = None
        layer_num_key_value_heads: list[int] | None = None
        layer_intermediate_sizes: list[int] | None = None
        attention_output_bias: bool = False
        mlp_output_bias: bool = False

        def __post_init__(self, **kwargs):
            heads = getattr(self, family.heads_field)
            n = self.num_hidden_layers
            if self.head_dim is None:
                self.head_dim = self.hidden_size // heads
            if self.layer_num_attention_heads is None:
                self.layer_num_attention_heads = [heads] * n
            if self.layer_num_key_value_heads is None:
                kv = getattr(self, family.kv_field) if family.kv_field else None
                self.layer_num_key_value_heads = [kv or heads] * n
            if self.layer_intermediate_sizes is None:
                self.layer_intermediate_sizes = [getattr(self, family.width_field)] * n
            super().__post_init__(**kwargs)

        def validate_architecture(self):
            """Per-layer counts replace the stock rule that heads divide the hidden size."""
            lists = (self.layer_num_attention_heads, self.layer_num_key_value_heads, self.layer_intermediate_sizes)
            if any(len(x) != self.num_hidden_layers for x in lists):
                raise ValueError("per-layer counts must have one entry per decoder layer")
            for i, (heads, kv, width) in enumerate(zip(*lists)):
                if heads < 1 or kv < 1 or width < 1 or heads % kv:
                    raise ValueError(f"layer {i}: {heads} heads over {kv} KV heads, {width} MLP channels "
                                     "is not a valid layer")

        def layer_config(self, layer_idx: int) -> PretrainedConfig:
            """A copy of this config with layer ``layer_idx``'s counts, for building its decoder layer.

            Set as attributes, past the stock validation (which would demand heads dividing hidden).
            """
            config = copy.copy(self)
            if family.narrow_attention is None:
                setattr(config, family.heads_field, self.layer_num_attention_heads[layer_idx])
            if family.kv_field:
                setattr(config, family.kv_field, self.layer_num_key_value_heads[layer_idx])
            setattr(config, family.width_field, self.layer_intermediate_sizes[layer_idx])
            return config

    class ForCausalLM(family.causal_lm_class):
        __doc__ = f"""{family.causal_lm_class.__name__} whose decoder layers each have their own widths."""

        config_class = Config

        def __init__(self, config: Config):
            super().__init__(config)
            layers = self.get_submodule(family.layers)
            for i in range(len(layers)):
                layers[i] = _decoder_layer(family, config, i)
            self.post_init()

    for cls, suffix in ((Config, "Config"), (ForCausalLM, "ForCausalLM")):
        cls.__name__ = cls.__qualname__ = f"Numprune{family.name}{suffix}"
    return Config, ForCausalLM


def _decoder_layer(family: Family, config, layer_idx: int) -> nn.Module:
    layer = family.layer_class(config.layer_config(layer_idx), layer_idx)
    if family.narrow_attention is not None:
        family.narrow_attention(layer, config.layer_num_attention_heads[layer_idx], config.head_dim)
    for wanted, path in zip((config.attention_output_bias, config.mlp_output_bias),
                            (family.modules.attention_output, family.modules.mlp_output)):
        projection = layer.get_submodule(path)
        if wanted and projection.bias is None:  # Conv1D always has one; an nn.Linear may not
            projection.bias = nn.Parameter(torch.zeros(projection.out_features))
    return layer
