"""Model code the families share: module layouts, numprune's per-layer classes, LlamaGen.

A uniformly pruned model is saved with the stock config class of its family and loads in plain
transformers. A model whose layers keep different numbers of heads or MLP channels needs per-layer
counts in its config; numprune's classes (one pair per family, model type ``numprune_<stock type>``,
made by ``per_layer.per_layer_classes``) carry them. Each family's module (numprune/families/)
registers its pair with the Auto classes when ``numprune`` is imported, so
``AutoModelForCausalLM.from_pretrained`` loads such a folder without ``trust_remote_code``.
"""
