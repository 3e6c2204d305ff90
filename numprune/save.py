"""Saving a pruned model: a plain Hugging Face folder plus pruning_report.json and a model card, written atomically.

Written through numprune.io.output: a hidden temporary folder beside the target, renamed into
place only when complete, so an interrupted or failed run never leaves a half-written output
folder, and never written into or over the model it was pruned from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from numprune.card import write_pruned_card
from numprune.errors import NumpruneError
from numprune.io.output import output_folder
from numprune.models import source_folder
from numprune.recipe import FLAG
from numprune.report import REPORT_NAME, check_report


def save_pruned(model, tokenizer, report: Mapping, out: str | os.PathLike, overwrite: bool = False,
                inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Write ``model`` (safetensors), its tokenizer and the report (a PruneReport, or a dict) to ``out`` atomically.

    ``out`` may not be, contain or lie inside ``inputs`` or the folders the model and the tokenizer were loaded from;
    an existing ``out`` is replaced only with ``overwrite`` and only if it is a numprune output.
    """
    FLAG.check("overwrite", overwrite)
    if not hasattr(model, "save_pretrained"):
        raise NumpruneError(f"expected a loaded transformers model (with save_pretrained), got {type(model).__name__}")
    inputs = [*inputs, source_folder(model), source_folder(tokenizer)]
    with output_folder(out, overwrite=overwrite, inputs=inputs, marker=REPORT_NAME) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(dict(report), indent=2) + "\n")
        write_pruned_card(tmp, report, _loaded_from(model))
    return Path(out)


def _loaded_from(model) -> str | None:
    """The folder or hub id ``model`` was loaded from (its config's ``_name_or_path``), for the model card."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def read_report(folder: str | os.PathLike) -> dict | None:
    """The pruning report saved in ``folder``, checked (``check_report``); None when there is none (a dense model)."""
    path = Path(folder).expanduser() / REPORT_NAME
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise NumpruneError(f"{path} is not a valid pruning report ({e})") from None
    if not isinstance(report, dict):
        raise NumpruneError(f"{path} is not a valid pruning report (not a JSON object)")
    return check_report(report, path)
