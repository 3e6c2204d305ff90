"""Saving a pruned model: a plain Hugging Face folder plus pruning_report.json, written atomically.

Everything is written into a hidden temporary folder beside the target and renamed into place only
when complete, so an interrupted or failed run never leaves a half-written output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from numprune.errors import NumpruneError

REPORT_NAME = "pruning_report.json"


def check_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early, before any long work, if ``out`` cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise NumpruneError(f"output folder {out} already exists (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise NumpruneError(f"output path {out} exists and is not a folder")
    parent = out.resolve().parent
    if parent.exists() and not os.access(parent, os.W_OK):
        raise NumpruneError(f"cannot write into {parent}")
    return out


@contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` that becomes ``out`` only if the block completes."""
    out = check_output(out, overwrite)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
            out.rename(old / "x")
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``out`` that replaces ``out`` only if the block completes."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp's 0600 would hide the file from other users
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_pruned(model, tokenizer, report: dict, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` (safetensors), its tokenizer and the report to ``out`` atomically."""
    with atomic_folder(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return Path(out)
