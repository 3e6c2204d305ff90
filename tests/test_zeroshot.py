"""Zero-shot evaluation through lm-eval on the packaged offline task, checked against our own scoring."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from conftest import tiny_llama
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from numprune.cli import main
from numprune.errors import NumpruneError
from numprune.evaluate import zeroshot

TASK = "numprune_offline_arc"


def _items() -> list[dict]:
    path = zeroshot.TASKS_DIR / f"{TASK}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _prompt(item: dict) -> str:
    return f"Question: {item['question']}\nAnswer:"  # the task YAML's doc_to_text


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """A random tiny LLaMA and a word-level tokenizer over the task's own words (built offline)."""
    words = {w for item in _items() for text in [_prompt(item), *item["choices"]["text"]]
             for w in re.findall(r"\w+|[^\w\s]+", text)}
    vocab = {token: i for i, token in enumerate(["[UNK]", "[PAD]", "</s>", *sorted(words)])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        eos_token="</s>")
    model = tiny_llama("gqa", layers=2, vocab_size=len(vocab), max_position_embeddings=256)
    return model, tokenizer


def _own_accuracy(model, tokenizer) -> tuple[float, float]:
    """acc and acc_norm by hand: each choice scored by the summed log-probability of its tokens after the
    prompt, one unpadded sequence at a time; acc_norm divides by the choice's length in characters."""
    hits = hits_norm = 0
    for item in _items():
        context = tokenizer(_prompt(item), add_special_tokens=False).input_ids
        scores, lengths = [], []
        for choice in item["choices"]["text"]:
            ids = tokenizer(f"{_prompt(item)} {choice}", add_special_tokens=False).input_ids
            assert ids[:len(context)] == context
            with torch.no_grad():
                logprobs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
            scores.append(sum(logprobs[pos - 1, ids[pos]].item() for pos in range(len(context), len(ids))))
            lengths.append(len(choice))
        gold = item["choices"]["label"].index(item["answerKey"])
        hits += max(range(len(scores)), key=scores.__getitem__) == gold
        hits_norm += max(range(len(scores)), key=lambda i: scores[i] / lengths[i]) == gold
    return hits / len(_items()), hits_norm / len(_items())


def test_api_accuracy_matches_own_scoring(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    results = zeroshot.evaluate(model, tokenizer, tasks=[TASK], batch_size=3, out=tmp_path / "r.json")
    row = results["results"][TASK]
    acc, acc_norm = _own_accuracy(model, tokenizer)
    n = len(_items())
    assert row["samples"] == n
    assert row["acc"] == pytest.approx(acc) and row["acc_norm"] == pytest.approx(acc_norm)
    assert row["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert results["mean_acc"] == pytest.approx(acc)
    assert json.loads((tmp_path / "r.json").read_text()) == results
    table = zeroshot.format_table(results)
    assert f"| {TASK} | acc | {acc:.4f} |" in table and f"| {TASK} | acc_norm | {acc_norm:.4f} |" in table


def test_cli_eval_saved_folder_with_limit(model_and_tokenizer, tmp_path, capsys):
    model, tokenizer = model_and_tokenizer
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "cli.json"
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", TASK, "--limit", "10",
                 "--batch-size", "4", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    # The first 10 items alone, scored with the in-memory model, give the same accuracy.
    expected = zeroshot.evaluate(model, tokenizer, tasks=[TASK], limit=10)["results"][TASK]
    assert saved["results"][TASK]["samples"] == 10 and saved["protocol"]["limit"] == 10
    assert saved["results"][TASK]["acc"] == pytest.approx(expected["acc"])
    assert f"| {TASK} | acc |" in capsys.readouterr().out


def test_cli_unknown_task_is_one_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "absent"), "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("numprune: error: unknown task 'no_such_task'")


def test_unreachable_task_data_is_one_clear_error(tmp_path, monkeypatch):
    """A task whose data file is missing (as hub data is offline) fails with a NumpruneError, not a traceback."""
    shutil.copy(zeroshot.TASKS_DIR / f"{TASK}.yaml", tmp_path)
    monkeypatch.setattr(zeroshot, "TASKS_DIR", tmp_path)
    with pytest.raises(NumpruneError, match=f"could not load the data of task '{TASK}'"):
        zeroshot.load_tasks([TASK])
