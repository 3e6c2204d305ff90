"""Compensations (least squares, affine with a ridge, FLAP's bias, none) against direct solves and brute force."""

import pytest
import torch

from numprune import compensate
from numprune.calibrate import InputStats


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


def test_damping_makes_rank_deficient_inputs_a_ridge_fit_towards_the_kept_weights():
    """With a duplicated channel X^T X is singular; the damped refit is the ridge solution of
    min ||X_K W'^T - X W^T||^2 + gamma ||W' - W_K||^2, gamma = damp * mean diag(X^T X), and it
    shares the correction equally between the two copies of the channel."""
    x, w = problem(seed=4)
    x[:, 5] = x[:, 4]  # duplicate channel: X^T X is singular
    keep = torch.tensor([0, 1, 4, 5, 6])
    gram = x.T @ x
    assert torch.linalg.matrix_rank(gram[keep][:, keep]) == 4
    new = compensate.least_squares(w, gram, keep, damp=0.01)
    gamma = 0.01 * gram.diagonal().mean()
    # the ridge problem as one ordinary least-squares system: [X_K; sqrt(gamma) I] W'^T = [X W^T; sqrt(gamma) W_K^T]
    design = torch.cat([x[:, keep], gamma.sqrt() * torch.eye(len(keep), dtype=torch.float64)])
    target = torch.cat([x @ w.T, gamma.sqrt() * w[:, keep].T])
    torch.testing.assert_close(new, torch.linalg.lstsq(design, target).solution.T, rtol=1e-8, atol=1e-8)
    change = new - w[:, keep]
    torch.testing.assert_close(change[:, 2], change[:, 3], rtol=1e-8, atol=1e-10)  # channels 4 and 5


def affine_problem(n=500, d=9, out=5, seed=5):
    """Inputs with a clear mean (as after an activation), a weight and a bias."""
    x, w = problem(n, d, out, seed)
    x = x + torch.linspace(-2.0, 3.0, d, dtype=torch.float64)
    b0 = torch.randn(out, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return x, w, b0, InputStats(x.T @ x, x.sum(0), n)


def test_affine_without_ridge_is_a_direct_solve_with_an_intercept_column():
    x, w, b0, stats = affine_problem()
    keep = torch.tensor([0, 2, 3, 6, 8])
    new, shift = compensate.affine(w, stats, keep, damp=0.0)
    design = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    direct = torch.linalg.lstsq(design, x @ w.T + b0).solution.T  # [out, K + 1]
    torch.testing.assert_close(new, direct[:, :-1], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(b0 + shift, direct[:, -1], rtol=1e-8, atol=1e-8)


def test_affine_with_a_huge_ridge_is_flap_bias_compensation():
    x, w, b0, stats = affine_problem(seed=6)
    keep = torch.tensor([1, 4, 5, 7])
    new, shift = compensate.affine(w, stats, keep, damp=1e12)
    kept, bias = compensate.REGISTRY["bias"].fit(w, stats, keep, None)
    torch.testing.assert_close(new, kept, rtol=0, atol=1e-8)
    torch.testing.assert_close(shift, bias, rtol=0, atol=1e-8)
    torch.testing.assert_close(bias, w[:, [0, 2, 3, 6, 8]] @ x.mean(0)[[0, 2, 3, 6, 8]])


def test_no_other_affine_update_that_zeroes_the_removed_inputs_does_better():
    x, w, b0, stats = affine_problem(seed=7)
    keep = torch.tensor([0, 1, 3, 4, 8])
    new, shift = compensate.affine(w, stats, keep, damp=0.0)

    def error(kept_weight, bias):
        return ((x[:, keep] @ kept_weight.T + bias - x @ w.T - b0) ** 2).sum()

    best = error(new, b0 + shift)
    assert best < error(w[:, keep], b0 + compensate.bias_shift(w, stats.mean, keep))  # FLAP's bias
    assert best < error(compensate.least_squares(w, stats.gram, keep, 0.0), b0)  # the fit without intercept
    g = torch.Generator().manual_seed(8)
    for _ in range(200):
        dw = 1e-3 * torch.randn(new.shape, generator=g, dtype=torch.float64)
        db = 1e-3 * torch.randn(shift.shape, generator=g, dtype=torch.float64)
        assert error(new + dw, b0 + shift + db) >= best


@pytest.mark.parametrize("name,damp", [("least-squares", 0.0), ("least-squares", 0.3), ("affine", 0.0),
                                       ("affine", 0.3), ("bias", 0.0), ("none", 0.0)])
def test_removal_errors_equal_compensating_and_measuring(name, damp):
    """Brute force: for every k, remove the first k inputs of an order, compensate, and measure on the data."""
    x, w, b0, stats = affine_problem(seed=9)
    entry = compensate.REGISTRY[name]
    options = entry.options(compensation_damp=damp) if entry.options is compensate.Damped else entry.options()
    order = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(10))
    curve = entry.removal_errors(w, stats, order, options)
    for k in range(x.shape[1]):
        keep = order[k:].sort().values
        new, shift = entry.fit(w, stats, keep, options)
        out = x[:, keep] @ new.T + (shift if shift is not None else 0)
        measured = ((out - x @ w.T) ** 2).sum(1).mean()
        covariance = compensate.centred_covariance(stats) if name == "affine" else stats.second_moment
        ridge = damp * covariance.diagonal().mean() * (new - w[:, keep]).pow(2).sum()  # the fit's own penalty
        torch.testing.assert_close(curve[k], measured + ridge, rtol=1e-7, atol=1e-9)
