"""Optional dependencies: pruning needs only the base install; each feature beyond it needs an extra
(pyproject.toml's ``[eval]``, ``[data]``, ``[plots]``, ``[llamacpp]``, ``[heal]``, or ``[all]``), imported when the
feature is used, and a missing one is refused in one line that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from numprune.errors import NumpruneError

# Each optional top-level module -> (the package that installs it, the extra that names the package).
OPTIONAL = {"datasets": ("datasets", "data"), "sklearn": ("scikit-learn", "data"), "matplotlib": ("matplotlib", "plots"),
            "lm_eval": ("lm-eval", "eval"), "peft": ("peft", "heal"), "llama_cpp": ("llama-cpp-python", "llamacpp")}


def install_line(module: str, what: str) -> str:
    """The one line that says ``what`` needs ``module``'s extra."""
    package, extra = OPTIONAL[module.split(".")[0]]
    return f"{what} needs {package}, which is not installed: pip install 'numprune[{extra}]'"


def need(module: str, what: str) -> ModuleType:
    """``module`` imported; if its package is missing, a NumpruneError naming the extra (``what`` needs it)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:  # broken inside, not missing: as it is
            raise
        raise NumpruneError(install_line(module, what)) from None
