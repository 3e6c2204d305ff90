"""The one interface the pruning stages use to reach into a model family.

An adapter is the only place that knows module and parameter names. Everything else speaks of
decoder layers, attention heads (query heads grouped over KV heads) and MLP channels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from numprune.errors import NumpruneError
from numprune.modeling.layout import KV, MLP, QUERY, LayerModules


@dataclass(frozen=True)
class AttentionLayout:
    """Head layout of one attention block: query heads ``h`` use KV head ``h // group_size``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class UnitCosts:
    """Parameters that leave with one query head, one KV head (its K and V) and one MLP channel."""

    query_head: int
    kv_head: int
    channel: int


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer keeps: sorted query heads, KV heads and MLP channels."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    channels: tuple[int, ...]


class Adapter(ABC):
    """Where a family keeps its layers and what pruning cuts in them (``modules``).

    A family names ``layers_path`` and ``modules`` and says how its pruned config looks; the head
    layout, the unit costs and the slices of every tensor are worked out here, once for all families.
    """

    family: str = ""
    model_types: tuple[str, ...] = ()
    layers_path: str = ""  # the decoder layers' ModuleList in the causal LM
    modules: LayerModules
    learned_positions: bool = False  # a position table (GPT-2, OPT) caps the window length; rotary ones do not
    # healing is part of a method's default only where it was validated: on language models, not image generators
    heals_by_default: bool = True
    # numprune's own (config, causal LM) classes that pruned models of the family may be saved with;
    # ``numprune.adapters.register`` registers them with the Auto classes, so saved folders load.
    saved_classes: tuple[tuple[type[PretrainedConfig], type[PreTrainedModel]], ...] = ()

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.config = model.config
        for i in range(self.num_layers()):
            layout = self.attention_layout(i)
            if layout.num_kv_heads < 1 or layout.num_heads % layout.num_kv_heads:
                raise NumpruneError(f"layer {i}: {layout.num_heads} query heads over {layout.num_kv_heads} KV heads "
                                    "is not a grouped-query layout numprune can keep valid")

    @property
    def max_positions(self) -> int | None:
        """The longest window the model can read (its position table's size); None where no table caps it."""
        return self.config.max_position_embeddings if self.learned_positions else None

    def check_window(self, length: int) -> None:
        """Refuse, before any work, windows longer than the position table (they would index past it)."""
        if self.max_positions is not None and length > self.max_positions:
            raise NumpruneError(f"windows of {length} tokens are longer than this {self.family} model's "
                                f"{self.max_positions} positions")

    @abstractmethod
    def pruned_config(self, plans: list[LayerPlan], shifted: tuple[bool, bool] = (False, False)) -> PretrainedConfig:
        """The config of the shrunk model: the stock class when it can describe it, else numprune's. ``shifted``:
        whether a compensation shifts some attention / MLP output projection's bias (then they all have one)."""

    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""
        return self.model.get_submodule(self.layers_path)

    def num_layers(self) -> int:
        return len(self.layers())

    def attention_output(self, layer: nn.Module) -> nn.Module:
        """The projection whose input channels are the heads' outputs (o_proj): nn.Linear or Conv1D."""
        return layer.get_submodule(self.modules.attention_output)

    def mlp_output(self, layer: nn.Module) -> nn.Module:
        """The projection whose input channels are the MLP channels (down_proj): nn.Linear or Conv1D."""
        return layer.get_submodule(self.modules.mlp_output)

    def mlp_width(self, layer_idx: int) -> int:
        return projection_weight(self.mlp_output(self.layers()[layer_idx])).shape[1]

    def attention_layout(self, layer_idx: int) -> AttentionLayout:
        """Heads from the attention output's width; KV heads from the rows of the projection that holds them."""
        layer = self.layers()[layer_idx]
        head_dim = layer.get_submodule(self.modules.attention).head_dim
        heads = projection_weight(self.attention_output(layer)).shape[1] // head_dim
        path, blocks = next((path, blocks) for path, blocks in self.modules.inputs if KV in blocks)
        rows = projection_weight(layer.get_submodule(path)).shape[0] - blocks.count(QUERY) * heads * head_dim
        return AttentionLayout(heads, rows // (blocks.count(KV) * head_dim), head_dim)

    def unit_costs(self, layer_idx: int) -> UnitCosts:
        """Each input block loses a row (+ its bias) per channel; each output projection a column."""
        layer = self.layers()[layer_idx]
        head_dim = self.attention_layout(layer_idx).head_dim
        per_channel = {QUERY: 0, KV: 0, MLP: 0}
        for path, blocks in self.modules.inputs:
            projection = layer.get_submodule(path)
            row = projection_weight(projection).shape[1] + (projection.bias is not None)
            for block in blocks:
                per_channel[block] += row
        per_channel[QUERY] += projection_weight(self.attention_output(layer)).shape[0]
        per_channel[MLP] += projection_weight(self.mlp_output(layer)).shape[0]
        return UnitCosts(per_channel[QUERY] * head_dim, per_channel[KV] * head_dim, per_channel[MLP])

    def kept_indices(self, layer_idx: int, plan: LayerPlan) -> dict[str, tuple[int, torch.Tensor]]:
        """For each parameter of the layer that shrinks: (its state-dict name, the dim, indices kept)."""
        layer = self.layers()[layer_idx]
        layout = self.attention_layout(layer_idx)
        q, kv, channels = self.kept_channels(layer_idx, plan)
        blocks = {QUERY: (layout.num_heads * layout.head_dim, q), KV: (layout.num_kv_heads * layout.head_dim, kv),
                  MLP: (self.mlp_width(layer_idx), channels)}
        prefix = f"{self.layers_path}.{layer_idx}."
        kept = {}
        for path, kinds in self.modules.inputs:
            projection = layer.get_submodule(path)
            rows = fused_indices(*(blocks[kind] for kind in kinds))
            kept[f"{prefix}{path}.weight"] = (_out_dim(projection), rows)
            if projection.bias is not None:
                kept[f"{prefix}{path}.bias"] = (0, rows)
        for path, columns in ((self.modules.attention_output, q), (self.modules.mlp_output, channels)):
            kept[f"{prefix}{path}.weight"] = (1 - _out_dim(layer.get_submodule(path)), columns)
        return kept

    def prunable_parameters(self, layer_idx: int, plan: LayerPlan | None = None) -> int:
        """Parameters that heads and channels carry in this layer (what the ratio is a fraction of); with
        ``plan``, those that the heads and channels it keeps carry."""
        plan = self.full_plan(layer_idx) if plan is None else plan
        costs = self.unit_costs(layer_idx)
        return (len(plan.heads) * costs.query_head + len(plan.kv_heads) * costs.kv_head
                + len(plan.channels) * costs.channel)

    def kept_channels(self, layer_idx: int, plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projection channels the plan keeps: the query heads', the KV heads' and the MLP channels."""
        head_dim = self.attention_layout(layer_idx).head_dim
        return (head_channels(plan.heads, head_dim), head_channels(plan.kv_heads, head_dim),
                torch.tensor(plan.channels, dtype=torch.long, device="cpu"))

    def kept_inputs(self, layer_idx: int, plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Input channels the plan keeps in the attention and MLP output projections."""
        q, _, channels = self.kept_channels(layer_idx, plan)
        return q, channels

    def output_biases(self, shifted: tuple[bool, bool] = (False, False)) -> tuple[bool, bool]:
        """Whether any layer's attention / MLP output projection has a bias, or gets one from a compensation that
        shifts it (``shifted``, FLAP's bias compensation)."""
        return tuple(shift or any(get(layer).bias is not None for layer in self.layers())
                     for get, shift in zip((self.attention_output, self.mlp_output), shifted))

    def full_plan(self, layer_idx: int) -> LayerPlan:
        layout = self.attention_layout(layer_idx)
        return LayerPlan(tuple(range(layout.num_heads)), tuple(range(layout.num_kv_heads)),
                         tuple(range(self.mlp_width(layer_idx))))


def _out_dim(projection: nn.Module) -> int:
    """The weight dimension of a projection's outputs: 0 for nn.Linear ([out, in]), 1 for Conv1D ([in, out])."""
    return 1 if isinstance(projection, Conv1D) else 0


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a projection as ``[out, in]`` (a view: in-place edits reach the module).

    ``nn.Linear`` stores that layout already; GPT-2's ``Conv1D`` stores ``[in, out]``.
    """
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def fused_indices(*blocks: tuple[int, torch.Tensor]) -> torch.Tensor:
    """Kept indices into a fused dimension of consecutive blocks, given (block size, kept indices in it) each.

    E.g. Phi-3's ``qkv_proj`` rows [q; k; v] or GPT-2's ``c_attn`` columns [q | k | v].
    """
    kept, offset = [], 0
    for size, index in blocks:
        kept.append(index + offset)
        offset += size
    return torch.cat(kept)


def head_channels(heads: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """The projection channels of the given heads, in head order (index tensors live on the CPU, whatever
    torch's default device; indexing a tensor on another device with them works)."""
    return (torch.tensor(heads, dtype=torch.long, device="cpu")[:, None] * head_dim
            + torch.arange(head_dim, device="cpu")).reshape(-1)
