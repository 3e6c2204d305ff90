"""The model families numprune prunes, one module each, found without a list.

A family's module holds all numprune knows of it: its ``Family`` spec (where the decoder layers and
projections live, which config fields hold the widths), its adapter, and, through
``numprune.adapters.register``, the registration of the classes its pruned folders are saved with.
Importing this package imports every module in it, in name order (``import numprune`` does), so a
new family is a new file here (and its test).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from types import ModuleType


def import_modules(package: str, path: Iterable[str]) -> list[ModuleType]:
    """Import every module of ``package`` (found on ``path``), sorted by name: a fixed order, whatever order
    the file system lists them in."""
    return [importlib.import_module(f"{package}.{name}") for name in sorted(m.name for m in pkgutil.iter_modules(path))]


MODULES = import_modules(__name__, __path__)
