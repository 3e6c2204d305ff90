"""Surgery: build the narrower model from the dense one, what each layer keeps and its compensation's fits.

Compensation never edits the dense model: it returns each layer's fits (the refitted kept columns
of the two output projections, and a bias shift), and ``narrowed`` cuts a layer's tensors to what
its plan keeps, taking the output projections' columns and bias shifts from the fits. ``shrink``
builds the narrower model from the family's pruned config (the stock config class for uniform
widths, numprune's per-layer one otherwise) on the meta device and assigns it these tensors, so
the peak is the dense model plus one narrower copy, and the object in memory is exactly what
``from_pretrained`` rebuilds from the saved folder. The streamed path (numprune.stream) writes
each layer's ``narrowed`` tensors to disk instead.
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from numprune.adapters import Adapter, LayerPlan
from numprune.compensate import LayerFits


def kept_slices(state: dict[str, torch.Tensor], kept: dict[str, tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors named in ``kept`` (``adapter.kept_indices``) cut down to their kept slices."""
    return {name: state[name].index_select(dim, index.to(state[name].device)).contiguous()
            for name, (dim, index) in kept.items()}


def narrowed(adapter: Adapter, i: int, state: dict[str, torch.Tensor], plan: LayerPlan,
             fits: LayerFits | None = None) -> dict[str, torch.Tensor]:
    """Layer ``i``'s tensors that shrink, taken from ``state`` (full names) and cut to what ``plan`` keeps; with
    ``fits``, the output projections' kept columns and bias shifts are the compensation's."""
    kept = adapter.kept_indices(i, plan)
    if fits is None:
        return kept_slices(state, kept)
    prefix = f"{adapter.layers_path}.{i}."
    outputs = {f"{prefix}{path}": fit for path, fit in zip((adapter.modules.attention_output,
                                                            adapter.modules.mlp_output), fits)}
    narrow = kept_slices(state, {name: k for name, k in kept.items() if name.removesuffix(".weight") not in outputs})
    for path, (columns, shift) in outputs.items():
        weight = state[f"{path}.weight"]
        dim, _ = kept[f"{path}.weight"]  # the input dimension: 1 for nn.Linear, 0 for GPT-2's Conv1D
        narrow[f"{path}.weight"] = (columns if dim == 1 else columns.T).to(weight).contiguous()
        if shift is not None:
            bias = state.get(f"{path}.bias")
            narrow[f"{path}.bias"] = (shift.to(weight) if bias is None else bias + shift.to(bias)).contiguous()
    return narrow


def shifted(fits: list[LayerFits | None]) -> tuple[bool, bool]:
    """Whether any fit shifts an attention / MLP output projection's bias (the pruned config then has them)."""
    return tuple(any(f is not None and f[kind][1] is not None for f in fits) for kind in (0, 1))


def shrink(adapter: Adapter, plans: list[LayerPlan], fits: list[LayerFits] | None = None,
           share: bool = False) -> PreTrainedModel:
    """A new model with only the kept heads and channels of ``adapter.model`` (left as it is), compensated by
    ``fits`` (one per layer, from numprune.pipeline.compensate). Tensors that do not shrink (embeddings, norms)
    are copied, or with ``share`` the new model shares them with ``adapter.model``."""
    model = adapter.model
    fits = fits or [None] * len(plans)
    dense = model.state_dict()
    state, copies = {}, {}
    for i, plan in enumerate(plans):
        state |= narrowed(adapter, i, dense, plan, fits[i])
    for name, tensor in (item for item in dense.items() if item[0] not in state):  # what does not shrink
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype, tensor.device)  # a tied tensor: under each name
        if not share and key not in copies:
            copies[key] = tensor.clone()
        state[name] = tensor if share else copies[key]
    del dense, copies
    config = adapter.pruned_config(plans, shifted(fits))
    config._attn_implementation = model.config._attn_implementation
    weight = next(model.parameters())
    # parameters on the meta device, assigned below; buffers (rotary tables) real, where the weights are
    with torch.device(weight.device), init_empty_weights(include_buffers=False), no_init_weights():
        shrunk = AutoModelForCausalLM.from_config(config, dtype=weight.dtype)
    expected = shrunk.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if unexpected or any(not name.endswith(".bias") for name in missing):
        raise RuntimeError(f"pruned state dict does not fit the pruned config: {missing + unexpected}")
    # biases the config adds beside compensated ones (e.g. q/k/v beside o_proj) start at 0
    state |= {name: torch.zeros(expected[name].shape, dtype=weight.dtype, device=weight.device) for name in missing}
    shrunk.load_state_dict(state, assign=True)
    shrunk.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        shrunk.generation_config = model.generation_config
    return shrunk.eval()
