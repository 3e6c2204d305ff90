"""Shared fixtures: tiny random LLaMA-layout models of several shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import numprune  # noqa: F401  (registers the per-layer classes)

SHAPES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=32, intermediate_size=48),
    "gqa": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48, intermediate_size=40),
    "odd": dict(num_attention_heads=5, num_key_value_heads=5, hidden_size=40, intermediate_size=45, head_dim=6),
    "gqa9": dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=36, intermediate_size=45, head_dim=4),
}


def tiny_llama(shape: str = "gqa", layers: int = 3, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(vocab_size=97, num_hidden_layers=layers, max_position_embeddings=128, tie_word_embeddings=True)
    config = LlamaConfig(**{**fields, **SHAPES[shape], **overrides})
    return break_symmetry(LlamaForCausalLM(config).eval())


def break_symmetry(model):
    """``model`` with its matrices redrawn: the default init is too symmetric for scores to differ between units."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def tiny_tokens(n: int = 6, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tokens() -> torch.Tensor:
    return tiny_tokens()


@pytest.fixture
def one_thread():
    """One torch thread: a token step of a tiny model is too small to share, and on busy cores two threads wait on
    each other (sampling 16 tokens took 100x longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
