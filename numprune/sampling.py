"""Seeded token sampling shared by every generator numprune samples from (text and image models).

All randomness is one uniform number per sample and position, drawn up front from a CPU
``torch.Generator`` seeded with the seed alone, and each token is read off the inverse CDF of the
warped next-token distribution at that number. Sample ``i`` therefore sees the same numbers
whatever the batch size or device, and the same seed gives the same tokens.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from numprune.errors import NumpruneError


def check_warping(temperature: float, top_k: int, top_p: float) -> None:
    """Fail early on a temperature, top-k or top-p that does not describe a distribution."""
    if temperature < 0:
        raise NumpruneError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise NumpruneError(f"top-k must be >= 0 (0: off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise NumpruneError(f"top-p must be in (0, 1], got {top_p}")


def uniform_draws(samples: int, length: int, seed: int) -> torch.Tensor:
    """The ``[samples, length]`` float64 uniforms that drive sampling: row ``i`` is sample ``i``'s, whatever the batching."""
    return torch.rand(samples, length, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def pick_tokens(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]: inverse-CDF sampling at ``uniform`` [B] (argmax if temperature is 0).

    Temperature, then top-k, then top-p (transformers' logits warpers) shape the distribution.
    """
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    cdf = scores.softmax(-1).double().cumsum(-1)
    index = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1]).unsqueeze(-1), right=True)
    return index.squeeze(-1).clamp_max(logits.shape[-1] - 1)
