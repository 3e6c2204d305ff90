"""The shared inverse-CDF token draw against an exact float64 computation from the definitions."""

from __future__ import annotations

import pytest
import torch

from numprune.sampling import CDF_BLOCK, NUCLEUS_CANDIDATES, pick_tokens


def exact_picks(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Float64 throughout: full descending sort for the nucleus, one cumulative sum over the whole vocabulary."""
    probs = (logits.double() / temperature).softmax(-1)
    ordered, order = probs.sort(-1, descending=True)
    likelier = ordered.cumsum(-1) - ordered
    kept = torch.zeros_like(probs).scatter(-1, order, (likelier < top_p).double()) > 0
    cdf = torch.where(kept, probs, 0.0).cumsum(-1)
    return (cdf <= (uniform * cdf[:, -1])[:, None]).sum(-1)


@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.6])
def test_picks_equal_the_exact_draw_on_a_wide_vocabulary(top_p):
    """Rows from peaked to flat, so nuclei range from one token to far beyond the first candidate count."""
    vocab = 3 * CDF_BLOCK * 8 + 17  # several blocks and a ragged last one
    generator = torch.Generator().manual_seed(0)
    spread = torch.logspace(-1, 1.2, 96)[:, None]
    logits = torch.randn(96, vocab, generator=generator) * spread
    uniform = torch.rand(96, generator=generator, dtype=torch.float64)
    picks = pick_tokens(logits, uniform, 0.8, 0, top_p)
    exact = exact_picks(logits, uniform, 0.8, top_p)
    widths = (logits.double() / 0.8).softmax(-1).sort(-1, descending=True).values.cumsum(-1).lt(top_p).sum(-1) + 1
    if top_p < 1:
        assert widths.min() == 1 and widths.max() > 4 * NUCLEUS_CANDIDATES  # both ends of the widening are used
    assert (picks != exact).sum() == 0


def test_a_removed_token_is_never_drawn_even_at_the_ends_of_the_unit_interval():
    logits = torch.full((4, 2 * CDF_BLOCK), -30.0)
    logits[:, [3, CDF_BLOCK + 5]] = 0.0  # two tokens hold all the mass, in different blocks
    uniform = torch.tensor([0.0, 1e-300, 0.5, 1 - 2**-52], dtype=torch.float64)
    assert pick_tokens(logits, uniform, 1.0, 0, 0.9).tolist() == [3, 3, CDF_BLOCK + 5, CDF_BLOCK + 5]
