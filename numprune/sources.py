"""Layer sources: where a pruning run finds its decoder layers, one at a time.

The run (numprune.pipeline) never holds more than the layer a source hands out: ``InMemory``
hands out the layers of a loaded model as they are and keeps each layer's fits; numprune.stream's
``StreamedModel`` reads each from disk while it is visited, frees it after, and writes each layer
narrowed with its fits once they are computed. Healing (numprune.heal) reads two sources, the dense
and the pruned model, and hands each healed layer back to the pruned one (``healed``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

import torch
from torch import nn

from numprune.adapters import Adapter, LayerPlan, adapter_for
from numprune.compensate import LayerFits


class LayerSource(Protocol):
    """What the run asks of a model: its adapter, each layer while visited, the first layer's inputs, and
    each layer back once compensated."""

    adapter: Adapter

    def layer(self, i: int) -> AbstractContextManager[nn.Module]:
        """Decoder layer ``i``, its weights present while the block runs."""

    def inputs(self) -> AbstractContextManager[None]:
        """While the block runs, whatever computing the first layer's inputs needs (embeddings) is present."""

    def done(self, i: int, layer: nn.Module, plan: LayerPlan, fits: LayerFits) -> None:
        """Layer ``i`` keeps what ``plan`` says, its output projections refit as ``fits`` say."""

    def healed(self, i: int, layer: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
        """Layer ``i`` healed: ``state`` its fitted weights (any dtype), or None where it stays as it is."""


class InMemory(LayerSource):
    """The layer source of a loaded model: its layers as they are."""

    def __init__(self, model: nn.Module):
        self.adapter = adapter_for(model)
        self.fits: list[LayerFits] = []  # each layer's, for ``shrink``

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        yield self.adapter.layers()[i]

    def inputs(self) -> AbstractContextManager[None]:
        """What the first layer's inputs need is loaded already."""
        return nullcontext()

    def done(self, i: int, layer: nn.Module, plan: LayerPlan, fits: LayerFits) -> None:
        """Keep the fits: ``shrink`` builds the narrower model from the dense one and them at the end."""
        self.fits.append(fits)

    def healed(self, i: int, layer: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
        """The fitted weights into the layer itself, in its own dtype."""
        if state is not None:
            layer.load_state_dict(state)
