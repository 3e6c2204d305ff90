"""Resolve a model spec (the embedded model, a local folder or a hub id) to a model and its tokenizer."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from numprune.data.assets import SMOLLM2_PACKAGE, smollm2_folder
from numprune.errors import NumpruneError

EMBEDDED_MODEL = "smollm2"
# Files whose presence means a folder ships a tokenizer (fast, sentencepiece or BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer, description)`` for ``spec``, the model in eval mode.

    ``None`` or ``"smollm2"`` is the embedded SmolLM2-135M-Instruct (works offline); an existing
    folder is loaded as saved (its tokenizer is None if it has none, as a pruned model saved
    without one); anything else is a hub id. The description says where the model came from, for
    reports.
    """
    if spec is None or spec == EMBEDDED_MODEL:
        folder = smollm2_folder()
        version = importlib.metadata.version(SMOLLM2_PACKAGE)
        description = f"SmolLM2-135M-Instruct (embedded, {SMOLLM2_PACKAGE} {version})"
        return *_load(str(folder), dtype, with_tokenizer=True), description
    folder = Path(spec).expanduser()
    if folder.is_dir():
        has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
        return *_load(str(folder), dtype, with_tokenizer=has_tokenizer), str(folder.resolve())
    if _looks_like_path(spec):
        raise NumpruneError(f"no model folder at {spec}")
    return *_load(spec, dtype, with_tokenizer=True), spec


def _looks_like_path(spec: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``. A leading ``.``, ``~`` or ``/``, a second ``/``, a ``\\``
    or an ``owner`` that is a local folder (``runs/pruned``) means a path: better a clear "no folder"
    than a hub lookup that retries for 20 s before failing."""
    return (spec.startswith((".", "~", "/")) or spec.count("/") > 1 or "\\" in spec
            or ("/" in spec and Path(spec).parent.is_dir()))


def _load(source: str, dtype: torch.dtype, with_tokenizer: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(source) if with_tokenizer else None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NumpruneError(f"could not load model '{source}': {reason}") from None
    return model, tokenizer
