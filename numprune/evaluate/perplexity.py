"""Perplexity over fixed token windows, the yardstick for dense and pruned models alike."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from numprune.errors import NumpruneError
from numprune.evaluate.base import Column, Evaluation, Measurement


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``windows`` (``[n, L]`` token ids), each window scored on its own.

    Each window contributes its ``L - 1`` next-token predictions (``summed_nll``).
    Returns ``ppl``, ``nll`` (mean per predicted token), ``tokens`` (``n * (L - 1)``), ``windows``, ``seqlen``.
    """
    count, seqlen = windows.shape
    if count < 1 or seqlen < 2:
        raise NumpruneError(f"perplexity needs at least one window of two or more tokens, "
                            f"got shape {tuple(windows.shape)}")
    total = summed_nll(model, windows, batch_size, progress)
    tokens = count * (seqlen - 1)
    mean = total / tokens
    return dict(ppl=math.exp(mean), nll=mean, tokens=tokens, windows=count, seqlen=seqlen)


@torch.inference_mode()
def summed_nll(model, ids: torch.Tensor, batch_size: int = 1, progress: bool = True, desc: str = "perplexity") -> float:
    """Summed negative log-likelihood of every token of ``ids`` ``[n, L]`` after the first, teacher-forced.

    The log-softmax runs in float32 whatever the model's dtype (bf16/fp16 log-probabilities are too
    coarse to compare pruned models); the sum is kept in float64 so that long evaluations do not drift.
    """
    total = torch.zeros((), dtype=torch.float64)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = ids[start:start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        total += nll.double().sum().cpu()
    return total.item()


class Perplexity(Evaluation):
    """Perplexity on named evaluation texts: one column per text, dense and pruned on the same windows."""

    row_key = "ppl"
    report_key = "perplexity"
    plot_name = "perplexity.png"

    def __init__(self, windows: dict[str, tuple[torch.Tensor, dict]], progress: bool = False):
        """``windows``: each text's name -> its windows ``[n, L]`` and their record (``evaluation_windows``)."""
        self.windows = windows
        self.progress = progress

    def describe(self) -> dict:
        return {name: info for name, (_, info) in self.windows.items()}

    def columns(self) -> list[Column]:
        return [Column(name, name, ".2f", csv_name=f"ppl_{name}", quantity="perplexity", log_scale=True)
                for name in self.windows]

    def measure(self, model) -> Measurement:
        return Measurement({name: perplexity(model, windows, progress=self.progress)["ppl"]
                            for name, (windows, _) in self.windows.items()})

    def compared(self, dense: dict[str, float], pruned: dict[str, float]) -> dict:
        return {name: {"dense": dense[name], "pruned": pruned[name], "protocol": info}
                for name, info in self.describe().items()}

    def summary(self, dense: dict[str, float], pruned: dict[str, float]) -> list[str]:
        return [f"perplexity on {name} ({info['windows']} x {info['seqlen']} tokens): "
                f"dense {dense[name]:.2f} -> pruned {pruned[name]:.2f}" for name, info in self.describe().items()]
