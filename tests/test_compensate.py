"""Least-squares compensation (paper Eq. 9-11) against the literal formula and a direct solve."""

import torch

from numprune import compensate


def problem(n=400, d=10, out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix  # correlated channels
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    return x, w


def test_matches_equation_11_and_a_direct_least_squares_solve():
    x, w = problem()
    keep = torch.tensor([0, 2, 3, 5, 8, 9])
    pruned = torch.tensor([1, 4, 6, 7])
    gram = x.T @ x
    new = compensate.least_squares(w, gram, keep, damp=0.0)

    # Eq. 11 in the paper's layout (rows = input channels): dW = -G^-1 M_p (M_p^T G^-1 M_p)^-1 M_p^T W.
    wp = w.T
    ginv = torch.linalg.inv(2 * gram)
    dw = -ginv[:, pruned] @ torch.linalg.inv(ginv[pruned][:, pruned]) @ wp[pruned]
    updated = wp + dw
    torch.testing.assert_close(updated[pruned], torch.zeros_like(updated[pruned]), atol=1e-9, rtol=0)
    torch.testing.assert_close(new, updated[keep].T, rtol=1e-8, atol=1e-8)

    # Direct least squares: the kept inputs reproduce the dense output as well as they can.
    direct = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(new, direct, rtol=1e-7, atol=1e-7)


def test_no_other_update_that_zeroes_the_pruned_rows_does_better():
    x, w = problem(seed=1)
    keep = torch.tensor([1, 2, 3, 6, 7])
    new = compensate.least_squares(w, x.T @ x, keep, damp=0.0)

    def error(kept_weight):
        return ((x[:, keep] @ kept_weight.T - x @ w.T) ** 2).sum()

    best = error(new)
    assert best < error(w[:, keep])  # better than no compensation
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        assert error(new + 1e-3 * torch.randn(new.shape, generator=g, dtype=torch.float64)) >= best


def test_apply_zeroes_removed_columns_in_place():
    x, w = problem(seed=3)
    linear = torch.nn.Linear(10, 6, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(w)
    keep = torch.tensor([0, 1, 4, 5, 9])
    compensate.apply(linear, keep, (compensate.least_squares(w, x.T @ x, keep, damp=0.0), None))
    removed = torch.tensor([2, 3, 6, 7, 8])
    assert torch.count_nonzero(linear.weight[:, removed]) == 0
    torch.testing.assert_close(linear.weight[:, keep], compensate.least_squares(w, x.T @ x, keep, damp=0.0))
    assert linear.bias is None
    compensate.apply(linear, torch.tensor([0, 1]), (linear.weight[:, :2].clone(), torch.ones(6, dtype=torch.float64)))
    assert torch.count_nonzero(linear.weight[:, 2:]) == 0
    torch.testing.assert_close(linear.bias.detach(), torch.ones(6, dtype=torch.float64))


def test_damping_keeps_rank_deficient_inputs_solvable():
    x, w = problem(seed=4)
    x[:, 5] = x[:, 4]  # duplicate channel: X^T X is singular
    new = compensate.least_squares(w, x.T @ x, torch.tensor([0, 1, 4, 5, 6]), damp=0.01)
    assert torch.isfinite(new).all()
