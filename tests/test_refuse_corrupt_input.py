"""Corrupt, truncated or nonsensical inputs: one line and status 2, never a traceback, a hang or a
model silently loaded with random tensors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hostile import refused
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from numprune.data.corpora import MAX_TEXT_FILE_BYTES

WEIGHTS = "model.safetensors"
DOWN = "model.layers.0.mlp.down_proj.weight"


def _state(state):
    state = dict(state)
    state.pop(DOWN)
    return state


CORRUPT_WEIGHTS = {
    "missing tensor": (lambda s: _state(s), "missing tensor"),
    "unexpected tensor": (lambda s: {**s, "model.extra.weight": torch.zeros(3)}, "unexpected tensor"),
    "mis-shaped tensor": (lambda s: {**s, DOWN: torch.zeros(3, 3)}, f"mismatched tensor {DOWN} (shape [3, 3] in the file"),
    "NaN weights": (lambda s: {**s, DOWN: torch.full_like(s[DOWN], float("nan"))}, "NaN or infinite"),
}
CORRUPT_BYTES = {
    "truncated safetensors": (lambda b: b[: len(b) // 2], "not a readable safetensors file"),
    "zero-byte safetensors": (lambda b: b"", "not a readable safetensors file"),
    "garbage safetensors": (lambda b: os.urandom(4096), "not a readable safetensors file"),
}
BAD_CONFIGS = {
    "heads that do not divide the hidden size": ({"num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": None},
                                                 "The hidden size (36) is not a multiple of the number of attention "
                                                 "heads (5)"),
    "config with -1 layers": ({"num_hidden_layers": -1}, "must be a positive integer"),
    "config with 0 attention heads": ({"num_attention_heads": 0}, "must be a positive integer"),
    "KV heads that do not divide the heads": ({"num_key_value_heads": 4}, "do not divide"),
}


@pytest.fixture
def copy(tiny_model_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_folder, folder)
    return folder


@pytest.mark.parametrize("case", sorted(CORRUPT_WEIGHTS))
def test_weights_that_do_not_fit_the_config_are_refused(copy, case):
    change, message = CORRUPT_WEIGHTS[case]
    save_file(change(load_file(copy / WEIGHTS)), copy / WEIGHTS, metadata={"format": "pt"})
    refused(f"info: {case}", message, "info", "--model", copy, inputs=[copy])


def test_a_mis_shaped_tensor_is_refused_when_streaming_too(copy, tmp_path):
    change, message = CORRUPT_WEIGHTS["mis-shaped tensor"]
    save_file(change(load_file(copy / WEIGHTS)), copy / WEIGHTS, metadata={"format": "pt"})
    refused("prune --stream: mis-shaped tensor", message, "prune", "--stream", "--model", copy, "--ratio", "0.3",
            "--nsamples", "2", "--seqlen", "8", "--calib", "moby-dick", "--out", tmp_path / "out", inputs=[copy])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(CORRUPT_BYTES))
def test_broken_safetensors_files_are_refused(copy, case):
    change, message = CORRUPT_BYTES[case]
    (copy / WEIGHTS).write_bytes(change((copy / WEIGHTS).read_bytes()))
    refused(f"info: {case}", message, "info", "--model", copy, inputs=[copy])
    refused(f"prune --stream: {case}", message, "prune", "--stream", "--model", copy, "--ratio", "0.3",
            "--out", copy.parent / "out", inputs=[copy])


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_nonsense_configs_are_refused(copy, case):
    fields, message = BAD_CONFIGS[case]
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **fields}))
    refused(f"info: {case}", message, "info", "--model", copy, inputs=[copy])
    refused(f"prune --stream: {case}", message, "prune", "--stream", "--model", copy, "--ratio", "0.3",
            "--nsamples", "2", "--seqlen", "8", "--calib", "moby-dick", "--out", copy.parent / "out", inputs=[copy])


def test_unreadable_config_and_index_are_refused(copy):
    (copy / "config.json").write_text("{not json")
    refused("info: config.json not JSON", "not readable JSON", "info", "--model", copy, inputs=[copy])
    (copy / "config.json").write_text("[]")
    refused("info: config.json not an object", "JSON object", "info", "--model", copy, inputs=[copy])


def test_an_index_naming_files_outside_the_folder_is_refused(copy):
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {DOWN: "../../etc/passwd"}}))
    refused("info: index names ../../etc/passwd", "outside the folder", "info", "--model", copy, inputs=[copy])


def test_a_corrupt_pruning_report_is_refused_by_bench(copy):
    (copy / "pruning_report.json").write_text('{"parameters": {"achieved_ratio": "lots"}}')
    refused("bench: corrupt pruning_report.json", "not a valid pruning report", "bench", "--model", copy,
            "--repeats", "1", inputs=[copy])


@pytest.mark.parametrize("report", ['{"method": 5', "{}", "[]", '{"method": "numerical", "options": 3}'])
def test_a_corrupt_pruning_report_is_refused_by_export(copy, tmp_path, report):
    (copy / "pruning_report.json").write_text(report)
    refused(f"export: pruning_report.json {report}", "pruning_report.json is not a valid pruning report", "export",
            "--model", copy, "--gguf", tmp_path / "m.gguf", inputs=[copy])
    assert not (tmp_path / "m.gguf").exists()


def test_calibration_files_that_are_not_plain_text_files_are_refused(tiny_model_folder, tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.txt"
    zero.symlink_to("/dev/zero")
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:  # sparse: no disk used
        f.truncate(MAX_TEXT_FILE_BYTES + 1)
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    # The FIFO and /dev/zero first, each in a fresh process with a time limit: a regression hangs or eats memory.
    for case, path, message, fresh in [("--calib FIFO", fifo, "not a regular file", True),
                                       ("--calib link to /dev/zero", zero, "not a regular file", True),
                                       ("--calib huge file", huge, "text files are read whole", False),
                                       ("--calib folder.txt", folder, "not a regular file", False)]:
        refused(f"prune {case}", message, "prune", "--model", tiny_model_folder, "--ratio", "0.3", "--calib", path,
                "--out", tmp_path / "out", inputs=[tiny_model_folder], **({"timeout": 120} if fresh else {}))
    refused("ppl --data FIFO", "not a regular file", "ppl", "--model", tiny_model_folder, "--data", fifo,
            inputs=[tiny_model_folder])
    assert not (tmp_path / "out").exists()


def test_windows_longer_than_a_position_table_are_refused_before_work(tiny_model_folder, tmp_path):
    gpt2 = tmp_path / "gpt2"
    vocab = json.loads((tiny_model_folder / "config.json").read_text())["vocab_size"]
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=vocab)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_folder / name, gpt2 / name)
    for case, args in [("prune --seqlen 64", ["prune", "--ratio", "0.3", "--nsamples", "2", "--seqlen", "64",
                                               "--calib", "moby-dick", "--out", tmp_path / "out"]),
                       ("prune --stream --seqlen 64", ["prune", "--stream", "--ratio", "0.3", "--nsamples", "2",
                                                       "--seqlen", "64", "--calib", "moby-dick", "--out", tmp_path / "out"]),
                       ("ppl --seqlen 64", ["ppl", "--data", "moby-dick", "--seqlen", "64", "--max-windows", "1"]),
                       ("compare --eval-seqlen 64", ["compare", "--ratios", "0.3", "--methods", "magnitude",
                                                     "--nsamples", "2", "--seqlen", "16", "--data", "moby-dick",
                                                     "--eval-seqlen", "64", "--out", tmp_path / "out"]),
                       ("bench --prompt-len 30 --new-tokens 8", ["bench", "--prompt-len", "30", "--new-tokens", "8",
                                                                 "--repeats", "1", "--batch", "1"])]:
        refused(f"GPT-2 (32 positions): {case}", "longer than", *args, "--model", gpt2, inputs=[gpt2])
    assert not (tmp_path / "out").exists()


def test_an_unusable_cache_is_refused_naming_its_variable(tmp_path, monkeypatch):
    a_file = tmp_path / "cache-file"
    a_file.write_text("not a folder")
    for cache, reason in [(a_file, "not a folder"), ("/dev/null", "not a folder"), (a_file / "below", "Not a directory"),
                          ("/proc", "")]:  # /proc: a folder nobody, root included, may create files in
        monkeypatch.setenv("NUMPRUNE_CACHE", str(cache))
        refused(f"NUMPRUNE_CACHE={cache}", f"numprune's cache {cache} (NUMPRUNE_CACHE", "info", "--model", "smollm2",
                inputs=[a_file])
        refused(f"NUMPRUNE_CACHE={cache}: ppl", reason, "ppl", "--model", "smollm2", "--data", "moby-dick",
                inputs=[a_file])


def test_a_hub_id_without_a_reachable_hub_says_what_to_do(tmp_path, monkeypatch):
    """Fresh processes: huggingface_hub reads its endpoint and offline switch when imported."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    done = refused("info --model owner/name, hub unreachable", "the Hugging Face hub (127.0.0.1) cannot be reached",
                   "info", "--model", "owner/name", fresh=True, inputs=[tmp_path])
    assert "a local model folder or 'smollm2'" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused("info --model owner/name, HF_HUB_OFFLINE=1 and not cached", "HF_HUB_OFFLINE is set but the Hugging Face "
            "cache does not hold it: give a local model folder or 'smollm2'", "info", "--model", "owner/name",
            fresh=True, inputs=[tmp_path])
