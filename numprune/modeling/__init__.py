"""numprune's registered model classes for pruned models whose layers differ in width.

A uniformly pruned model is saved with the stock config class of its family and loads in plain
transformers. A model whose layers keep different numbers of heads or MLP channels needs per-layer
counts in its config; numprune's classes (one pair per family, model type ``numprune_<stock type>``,
made by ``per_layer.per_layer_classes``) carry them and are registered with the Auto classes when
``numprune`` is imported, so ``AutoModelForCausalLM.from_pretrained`` loads such a folder without
``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from numprune.modeling.families import PER_LAYER_CLASSES, NumpruneLlamaConfig, NumpruneLlamaForCausalLM
from numprune.modeling.llamagen import LlamaGenConfig, LlamaGenForCausalLM  # noqa: F401  (registers itself)

for _config_class, _model_class in PER_LAYER_CLASSES.values():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)

__all__ = ["NumpruneLlamaConfig", "NumpruneLlamaForCausalLM"]
