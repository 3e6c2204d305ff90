"""Where numprune's cache lives: the embedded models converted once, the corpora, the digits model.

Known here, below the output writer, so that the writer keeps every other output out of it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$NUMPRUNE_CACHE`` or ``~/.cache/numprune`` (not created here: numprune.data.assets.cache_dir does)."""
    return Path(os.environ.get("NUMPRUNE_CACHE") or Path.home() / ".cache" / "numprune")
