"""What every family built from transformers' own model classes shares: module paths and the pruned config.

A family's module (numprune/families/) gives its adapter a ``spec``, a ``Family`` naming where its
layers live, what pruning cuts in them and which config fields hold the widths; the subclass adds
only which stock config fields can give the output projections a bias. Its per-layer classes
(numprune.modeling.per_layer) are made here, once per family.
"""

from __future__ import annotations

from huggingface_hub.errors import StrictDataclassError
from transformers import PretrainedConfig, PreTrainedModel

from numprune.adapters.base import Adapter, LayerPlan
from numprune.modeling.per_layer import BIAS_FIELDS, PER_LAYER_FIELDS, Family, per_layer_classes

# Config fields the pruned config sets itself (or that describe the file, not the model).
_NOT_CARRIED = ("model_type", "architectures", "transformers_version", "quantization_config", "head_dim",
                *PER_LAYER_FIELDS, *BIAS_FIELDS)


class StockAdapter(Adapter):
    """An adapter for a transformers family: the stock model type and numprune's per-layer one."""

    spec: Family
    per_layer: tuple[type[PretrainedConfig], type[PreTrainedModel]]  # numprune's classes, for per-layer widths

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.family = cls.spec.model_type
        cls.model_types = (cls.spec.model_type, cls.spec.numprune_model_type)
        cls.layers_path, cls.modules = cls.spec.layers, cls.spec.modules
        cls.per_layer = per_layer_classes(cls.spec)
        cls.saved_classes = (cls.per_layer,)

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        """Stock config fields under which the output projections have a bias where ``attention`` / ``mlp``
        say so (FLAP's bias compensation adds one); None when the stock config cannot express it."""
        return None if attention or mlp else {}

    def pruned_config(self, plans: list[LayerPlan], shifted: tuple[bool, bool] = (False, False)) -> PretrainedConfig:
        spec = self.spec
        heads = [len(p.heads) for p in plans]
        kv_heads = [len(p.kv_heads) for p in plans]
        widths = [len(p.channels) for p in plans]
        head_dim = self.attention_layout(0).head_dim
        biases = self.output_biases(shifted)
        base = {k: v for k, v in self.config.to_dict().items() if k not in _NOT_CARRIED}
        if len(set(zip(heads, kv_heads, widths))) == 1:
            config = self._stock_config(base, heads[0], kv_heads[0], widths[0], head_dim, *biases)
            if config is not None:
                return config
        config_class, model_class = self.per_layer
        # Attention that derives head_dim from hidden / heads is built with the unpruned count, then narrowed.
        top_heads = self.config.hidden_size // head_dim if spec.narrow_attention else max(heads)
        fields = {**base, spec.heads_field: top_heads, spec.width_field: max(widths), "head_dim": head_dim,
                  "layer_num_attention_heads": heads, "layer_num_key_value_heads": kv_heads,
                  "layer_intermediate_sizes": widths, "attention_output_bias": biases[0], "mlp_output_bias": biases[1]}
        if spec.kv_field:
            fields[spec.kv_field] = max(kv_heads)
        config = config_class(**fields)
        config.architectures = [model_class.__name__]
        return config

    def _stock_config(self, base: dict, heads: int, kv_heads: int, width: int, head_dim: int,
                      attention_bias: bool, mlp_bias: bool) -> PretrainedConfig | None:
        """The stock config of a uniform result, or None where the stock class cannot describe it."""
        spec = self.spec
        bias_fields = self.stock_bias_fields(attention_bias, mlp_bias)
        if bias_fields is None or (spec.narrow_attention and heads * head_dim != self.config.hidden_size):
            return None
        fields = {**base, **bias_fields, spec.heads_field: heads, spec.width_field: width}
        if spec.kv_field:
            fields[spec.kv_field] = kv_heads
        if not spec.narrow_attention:
            fields["head_dim"] = head_dim
        try:
            config = spec.config_class(**fields)
        except (ValueError, StrictDataclassError):  # e.g. LLaMA, Gemma: heads must divide the hidden size
            return None
        config.architectures = [spec.causal_lm_class.__name__]
        return config


def attention_bias_fields(adapter: StockAdapter, attention: bool, mlp: bool) -> dict | None:
    """``stock_bias_fields`` of families with LLaMA's ``attention_bias`` and no MLP bias (Qwen3, Gemma)."""
    return None if mlp else {"attention_bias": bool(adapter.config.attention_bias) or attention}
