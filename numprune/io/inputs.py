"""Checks of files numprune reads, below every module that reads them (models, the LlamaGen loader)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from numprune.errors import NumpruneError


def check_safetensors(path: Path) -> None:
    """A complete safetensors file: its header parses and its tensors fill the file (the library checks both)."""
    if not path.is_file():
        raise NumpruneError(f"the weights file {path} is missing")
    try:
        with safe_open(path, "pt") as f:
            f.keys()
    except (OSError, SafetensorError) as e:
        raise NumpruneError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None
