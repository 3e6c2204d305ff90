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
    """Where a family keeps its layers, projections and head layout."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.config = model.config
        for i in range(self.num_layers()):
            layout = self.attention_layout(i)
            if layout.num_kv_heads < 1 or layout.num_heads % layout.num_kv_heads:
                raise NumpruneError(f"layer {i}: {layout.num_heads} query heads over {layout.num_kv_heads} KV heads "
                                    "is not a grouped-query layout numprune can keep valid")

    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def attention_layout(self, layer_idx: int) -> AttentionLayout: ...

    @abstractmethod
    def mlp_width(self, layer_idx: int) -> int: ...

    @abstractmethod
    def attention_output(self, layer: nn.Module) -> nn.Module:
        """The projection whose input channels are the heads' outputs (o_proj): nn.Linear or Conv1D."""

    @abstractmethod
    def mlp_output(self, layer: nn.Module) -> nn.Module:
        """The projection whose input channels are the MLP channels (down_proj): nn.Linear or Conv1D."""

    @abstractmethod
    def unit_costs(self, layer_idx: int) -> UnitCosts: ...

    @abstractmethod
    def kept_indices(self, layer_idx: int, plan: LayerPlan) -> dict[str, tuple[int, torch.Tensor]]:
        """For each parameter of the layer that shrinks: (its state-dict name, the dim, indices kept)."""

    @abstractmethod
    def pruned_config(self, plans: list[LayerPlan]) -> PretrainedConfig:
        """The config of the shrunk model: the stock class when it can describe it, else numprune's."""

    # Derived helpers shared by all families.

    def num_layers(self) -> int:
        return len(self.layers())

    def prunable_parameters(self, layer_idx: int) -> int:
        """Parameters that heads and channels carry in this layer (what the ratio is a fraction of)."""
        layout, costs = self.attention_layout(layer_idx), self.unit_costs(layer_idx)
        return (layout.num_heads * costs.query_head + layout.num_kv_heads * costs.kv_head
                + self.mlp_width(layer_idx) * costs.channel)

    def kept_channels(self, layer_idx: int, plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projection channels the plan keeps: the query heads', the KV heads' and the MLP channels."""
        head_dim = self.attention_layout(layer_idx).head_dim
        return (head_channels(plan.heads, head_dim), head_channels(plan.kv_heads, head_dim),
                torch.tensor(plan.channels, dtype=torch.long))

    def kept_qkv(self, layer_idx: int, plan: LayerPlan) -> torch.Tensor:
        """The kept channels of a fused [q; k; v] projection (Phi-3's qkv_proj, GPT-2's c_attn, LlamaGen's wqkv)."""
        layout = self.attention_layout(layer_idx)
        q, kv, _ = self.kept_channels(layer_idx, plan)
        q_size, kv_size = layout.num_heads * layout.head_dim, layout.num_kv_heads * layout.head_dim
        return fused_indices((q_size, q), (kv_size, kv), (kv_size, kv))

    def kept_inputs(self, layer_idx: int, plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Input channels the plan keeps in the attention and MLP output projections."""
        q, _, channels = self.kept_channels(layer_idx, plan)
        return q, channels

    def output_biases(self) -> tuple[bool, bool]:
        """Whether any layer's attention / MLP output projection has a bias (FLAP's compensation adds one)."""
        return tuple(any(get(layer).bias is not None for layer in self.layers())
                     for get in (self.attention_output, self.mlp_output))

    def full_plan(self, layer_idx: int) -> LayerPlan:
        layout = self.attention_layout(layer_idx)
        return LayerPlan(tuple(range(layout.num_heads)), tuple(range(layout.num_kv_heads)),
                         tuple(range(self.mlp_width(layer_idx))))


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
    """The projection channels of the given heads, in head order."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
