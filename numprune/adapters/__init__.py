"""Model-family adapters: ``adapter_for(model)`` picks the one that knows the model's layout."""

from __future__ import annotations

from transformers import PreTrainedModel

from numprune.adapters.base import Adapter, AttentionLayout, LayerPlan, UnitCosts
from numprune.adapters.gemma import Gemma2Adapter, Gemma3TextAdapter
from numprune.adapters.gpt2 import GPT2Adapter
from numprune.adapters.llama import LlamaAdapter
from numprune.adapters.llamagen import LlamaGenAdapter
from numprune.adapters.mistral import MistralAdapter
from numprune.adapters.opt import OPTAdapter
from numprune.adapters.phi3 import Phi3Adapter
from numprune.adapters.qwen2 import Qwen2Adapter
from numprune.adapters.qwen3 import Qwen3Adapter
from numprune.errors import NumpruneError

ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma2Adapter,
                                       Gemma3TextAdapter, Phi3Adapter, OPTAdapter, GPT2Adapter, LlamaGenAdapter)


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def adapter_for(model: PreTrainedModel) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise NumpruneError(f"model type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}")


def check_window(model: PreTrainedModel, length: int) -> None:
    """Refuse windows of ``length`` tokens that a supported model's position table cannot hold (others pass)."""
    if getattr(model.config, "model_type", None) in supported_model_types():
        adapter_for(model).check_window(length)


__all__ = ["Adapter", "check_window", "AttentionLayout", "LayerPlan", "UnitCosts", "adapter_for", "supported_model_types"]
