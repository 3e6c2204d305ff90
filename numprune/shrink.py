"""Surgery: physically remove what a plan drops and build the narrower model.

The shrunk model is built afresh from the family's pruned config (the stock config class for
uniform widths, numprune's per-layer one otherwise) and the sliced state dict, so the object in
memory is exactly what ``from_pretrained`` will rebuild from the saved folder.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from numprune.adapters import Adapter, LayerPlan


def kept_slices(state: dict[str, torch.Tensor], kept: dict[str, tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``state`` with the tensors named in ``kept`` (``adapter.kept_indices``) cut down to their kept slices."""
    return {**state, **{name: state[name].index_select(dim, index.to(state[name].device)).contiguous()
                        for name, (dim, index) in kept.items()}}


def shrink(adapter: Adapter, plans: list[LayerPlan]) -> PreTrainedModel:
    """A new model with only the kept heads and channels of ``adapter.model``."""
    model = adapter.model
    state = model.state_dict()
    for i, plan in enumerate(plans):
        state = kept_slices(state, adapter.kept_indices(i, plan))
    config = adapter.pruned_config(plans)
    config._attn_implementation = model.config._attn_implementation
    weight = next(model.parameters())
    with torch.device(weight.device), no_init_weights():  # built where the weights are: no copy on the way
        shrunk = AutoModelForCausalLM.from_config(config, dtype=weight.dtype)
    missing, unexpected = shrunk.load_state_dict(state, strict=False)
    if unexpected or any(not name.endswith(".bias") for name in missing):
        raise RuntimeError(f"pruned state dict does not fit the pruned config: {missing + unexpected}")
    with torch.no_grad():  # biases the config adds beside compensated ones (e.g. q/k/v beside o_proj) start at 0
        for name in missing:
            shrunk.get_parameter(name).zero_()
    shrunk.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        shrunk.generation_config = model.generation_config
    return shrunk.eval()

