"""Perplexity over fixed token windows, the yardstick for dense and pruned models alike."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from numprune.errors import NumpruneError


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``windows`` (``[n, L]`` token ids), each window scored on its own.

    Each window contributes its ``L - 1`` next-token predictions. The log-softmax runs in float32
    whatever the model's dtype (bf16/fp16 log-probabilities are too coarse to compare pruned models),
    and the summed negative log-likelihood is kept in float64 so that long evaluations do not drift.
    Returns ``ppl``, ``nll`` (mean per predicted token), ``tokens`` (``n * (L - 1)``), ``windows``, ``seqlen``.
    """
    count, seqlen = windows.shape
    if count < 1 or seqlen < 2:
        raise NumpruneError(f"perplexity needs at least one window of two or more tokens, "
                            f"got shape {tuple(windows.shape)}")
    total = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for start in tqdm(range(0, count, batch_size), desc="perplexity", unit="batch", disable=not progress):
            ids = windows[start:start + batch_size].to(model.device)
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            targets = ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            total += nll.double().sum().cpu()
    tokens = count * (seqlen - 1)
    mean = total.item() / tokens
    return dict(ppl=math.exp(mean), nll=mean, tokens=tokens, windows=count, seqlen=seqlen)
