"""Layer sources: where a pruning run finds its decoder layers, one at a time.

The run (numprune.pipeline) never holds more than the layer a source hands out: ``InMemory``
hands out the layers of a loaded model as they are; numprune.stream's ``StreamedModel`` reads
each from disk while it is visited, frees it after, and writes each layer once it is compensated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Protocol

from torch import nn

from numprune.adapters import Adapter, LayerPlan, adapter_for


class LayerSource(Protocol):
    """What the run asks of a model: its adapter, each layer while visited, the first layer's inputs, and
    each layer back once compensated."""

    adapter: Adapter

    def layer(self, i: int) -> AbstractContextManager[nn.Module]:
        """Decoder layer ``i``, its weights present while the block runs."""

    def inputs(self) -> AbstractContextManager[None]:
        """While the block runs, whatever computing the first layer's inputs needs (embeddings) is present."""

    def done(self, i: int, layer: nn.Module, plan: LayerPlan) -> None:
        """Layer ``i`` is compensated (masked and refit) and keeps what ``plan`` says."""


class InMemory(LayerSource):
    """The layer source of a loaded model: its layers as they are."""

    def __init__(self, model: nn.Module):
        self.adapter = adapter_for(model)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        yield self.adapter.layers()[i]

    def inputs(self) -> AbstractContextManager[None]:
        """What the first layer's inputs need is loaded already."""
        return nullcontext()

    def done(self, i: int, layer: nn.Module, plan: LayerPlan) -> None:
        """Nothing to do: ``shrink`` slices the whole model at the end."""
