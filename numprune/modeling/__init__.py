"""numprune's registered model classes for pruned models whose layers differ in width.

A uniformly pruned model is saved with the stock config class of its family and loads in plain
transformers. A model whose layers keep different numbers of heads or MLP channels needs per-layer
counts in its config; these classes carry them and are registered with the Auto classes when
``numprune`` is imported, so ``AutoModelForCausalLM.from_pretrained`` loads such a folder without
``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from numprune.modeling.pruned_llama import NumpruneLlamaConfig, NumpruneLlamaForCausalLM

AutoConfig.register(NumpruneLlamaConfig.model_type, NumpruneLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(NumpruneLlamaConfig, NumpruneLlamaForCausalLM, exist_ok=True)

__all__ = ["NumpruneLlamaConfig", "NumpruneLlamaForCausalLM"]
