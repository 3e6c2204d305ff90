"""Seeded token sampling shared by every generator numprune samples from (text and image models).

All randomness is one uniform number per sample and position, drawn up front from a CPU
``torch.Generator`` seeded with the seed alone, and each token is read off the inverse CDF of the
warped next-token distribution at that number. Sample ``i`` therefore sees the same numbers
whatever the batch size or device, and the same seed gives the same tokens.

Speed: a text model's vocabulary is wide (SmolLM2: 49,152), and transformers' top-p warper sorts
all of it for every row: on 128 rows that sort took 4x the LM head's matrix product on this CPU.
So top-p here looks for the nucleus among the likeliest NUCLEUS_CANDIDATES tokens first (more only
for the rows whose nucleus is wider), and the inverse CDF is read in two levels (block totals, then
one block) instead of one cumulative sum over the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.generation.logits_process import TopKLogitsWarper

from numprune.errors import NumpruneError

NUCLEUS_CANDIDATES = 256  # first guess at the nucleus width; rows that need more get 4x, then 4x again ...
CDF_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF


def check_warping(temperature: float, top_k: int, top_p: float) -> None:
    """Fail early on a temperature, top-k or top-p that does not describe a distribution."""
    if not temperature >= 0:  # NaN too
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

    Temperature, then top-k (transformers' warper), then top-p shape the distribution. Top-p keeps a
    token when the tokens no likelier than it hold more than ``1 - top_p`` of the mass (transformers'
    rule; tokens exactly as likely as the least likely kept one are kept too). The token is the first,
    in vocabulary order, whose cumulative kept mass exceeds ``uniform`` times the kept total.
    """
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    probs = scores.softmax(-1)
    if top_p < 1.0:
        probs = probs * (probs >= _nucleus_floor(probs, top_p)[:, None])
    return _inverse_cdf(probs, uniform.to(probs.device))


def _nucleus_floor(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per row, the probability of the least likely token top-p keeps, found among the likeliest candidates."""
    rows, vocab = probs.shape
    floor = torch.empty(rows, dtype=probs.dtype, device=probs.device)
    pending = torch.arange(rows, device=probs.device)
    width = min(NUCLEUS_CANDIDATES, vocab)
    while len(pending):
        top = probs[pending].topk(width, dim=-1).values  # descending
        likelier = top.double().cumsum(-1) - top.double()  # mass of the candidates likelier than each
        kept = likelier < top_p
        settled = ~kept[:, -1] if width < vocab else torch.ones_like(kept[:, -1])
        floor[pending[settled]] = torch.where(kept, top, torch.inf)[settled].amin(-1)
        pending = pending[~settled]
        width = min(4 * width, vocab)
    return floor


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first index whose cumulative probability exceeds ``uniform`` x total: block totals, then one block.

    Rounding can put the target a hair outside the block's own running sum; the pick is then held to
    the block's first or last token of non-zero probability, so a removed token is never drawn.
    """
    rows, vocab = probs.shape
    blocks = F.pad(probs, (0, -vocab % CDF_BLOCK)).view(rows, -1, CDF_BLOCK)
    ends = blocks.sum(-1).double().cumsum(-1)
    target = uniform.double() * ends[:, -1]
    block = torch.searchsorted(ends, target[:, None], right=True).squeeze(-1).clamp_max(ends.shape[1] - 1)
    chosen = blocks[torch.arange(rows, device=probs.device), block]
    start = torch.where(block > 0, ends.gather(1, (block - 1).clamp_min(0)[:, None]).squeeze(-1), 0.0)
    running = chosen.double().cumsum(-1) + start[:, None]
    index = torch.searchsorted(running, target[:, None], right=True).squeeze(-1)
    nonzero = (chosen > 0).int()
    first = nonzero.argmax(-1)
    last = CDF_BLOCK - 1 - nonzero.flip(-1).argmax(-1)
    return block * CDF_BLOCK + torch.minimum(torch.maximum(index, first), last)
