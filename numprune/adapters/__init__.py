"""Model-family adapters: ``adapter_for(model)`` picks the registered one that knows the model's layout.

Each family's module in numprune/families/ registers its adapter with ``register`` when imported;
``import numprune`` imports them all. This package itself knows no family.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from numprune.adapters.base import Adapter, AttentionLayout, LayerPlan, UnitCosts
from numprune.errors import NumpruneError

_ADAPTERS: dict[str, type[Adapter]] = {}  # model type -> the adapter of its family


def register(adapter: type[Adapter]) -> type[Adapter]:
    """Make ``adapter_for`` pick ``adapter`` for its model types, and let ``AutoModelForCausalLM`` load the
    classes it saves pruned models with. A family module's class decorator."""
    for model_type in adapter.model_types:
        if model_type in _ADAPTERS:
            raise NumpruneError(f"model type {model_type!r} already belongs to {_ADAPTERS[model_type].__name__}; "
                                f"{adapter.__name__} cannot register it again")
    for config_class, model_class in adapter.saved_classes:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    _ADAPTERS.update(dict.fromkeys(adapter.model_types, adapter))
    return adapter


def registered() -> list[type[Adapter]]:
    """Every registered adapter, once each, in the order they were registered."""
    return list(dict.fromkeys(_ADAPTERS.values()))


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: PreTrainedModel) -> Adapter:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise NumpruneError(f"expected a loaded transformers model (a torch.nn.Module with a config), got "
                            f"{type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise NumpruneError(f"model type {model_type!r} is not supported; "
                            f"supported: {', '.join(supported_model_types())}")
    return _ADAPTERS[model_type](model)


def check_window(model: PreTrainedModel, length: int) -> None:
    """Refuse windows of ``length`` tokens that a supported model's position table cannot hold (others pass)."""
    if getattr(model.config, "model_type", None) in _ADAPTERS:
        adapter_for(model).check_window(length)


__all__ = ["Adapter", "AttentionLayout", "LayerPlan", "UnitCosts", "adapter_for", "check_window", "register",
           "registered", "supported_model_types"]
