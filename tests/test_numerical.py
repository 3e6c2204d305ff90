"""The Newton score (paper Eq. 3-7) against its closed form and brute force on random problems."""

import itertools

import pytest
import torch

from numprune.adapters import AttentionLayout
from numprune.calibrate import InputStats, LayerStats
from numprune.criteria.base import CriterionInputs
from numprune.criteria.numerical import gradient, newton_score, score


def random_problem(n=256, d=12, out=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)  # torch layout [out, D]
    return x, w


@pytest.mark.parametrize("lambda_rel", [1e-2, 1.0, 1e3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_newton_zeroes_gradient_and_matches_closed_form(lambda_rel, seed):
    x, w = random_problem(seed=seed)
    second = x.T @ x / x.shape[0]
    keep = 0.6
    z = newton_score(second, w, keep, lambda_rel=lambda_rel, damp=0.0, iterations=50)
    a = (w.T @ w) * second
    d = a.shape[0]
    lam = lambda_rel * a.diagonal().sum() / d
    assert gradient(a, lam, keep * d, z).norm() < 1e-8 * a.norm()
    # Closed form (Sherman-Morrison): z* = 1 - lam rho D / (1 + lam 1^T A^-1 1) A^-1 1
    ainv1 = torch.linalg.solve(a, torch.ones(d, dtype=torch.float64))
    closed = 1 - lam * (1 - keep) * d / (1 + lam * ainv1.sum()) * ainv1
    torch.testing.assert_close(z, closed, rtol=1e-9, atol=1e-9)
    # The ranking is that of -A^-1 1, whatever lambda is.
    assert torch.equal(torch.argsort(z), torch.argsort(-ainv1))


def test_one_newton_step_reaches_the_minimiser():
    x, w = random_problem(seed=3)
    second = x.T @ x / x.shape[0]
    one = newton_score(second, w, 0.5, damp=0.0, iterations=1)
    many = newton_score(second, w, 0.5, damp=0.0, iterations=50)
    torch.testing.assert_close(one, many, rtol=1e-10, atol=1e-10)


def test_newton_objective_is_minimal_by_brute_force_over_a_grid():
    """F at the Newton point is no larger than at any point of a coarse grid over [0, 1]^4."""
    x, w = random_problem(d=4, seed=4)
    second = x.T @ x / x.shape[0]
    a = (w.T @ w) * second
    lam = a.diagonal().sum() / 4
    z = newton_score(second, w, 0.5, damp=0.0)

    def objective(v):
        return 0.5 * (1 - v) @ a @ (1 - v) + 0.5 * lam * (v.sum() - 2.0) ** 2

    grid = torch.linspace(0, 1, 6, dtype=torch.float64)
    best = min(objective(torch.stack(p)) for p in itertools.product(grid, repeat=4))
    assert objective(z) <= best + 1e-12


def test_score_is_invariant_to_the_scale_of_inputs_and_weights():
    x, w = random_problem(seed=5)
    second = x.T @ x / x.shape[0]
    z1 = newton_score(second, w, 0.7)
    z2 = newton_score(second * 1e4, w * 1e-3, 0.7)
    torch.testing.assert_close(z1, z2, rtol=1e-8, atol=1e-8)


def test_dead_channels_score_the_closed_form_of_the_damped_problem():
    """A channel that is never active makes A singular; damping adds gamma = damp * mean diag(A) to the diagonal,
    and the score is the closed form with that A. The dead channel's row of A is then gamma e_3, so
    (A^-1 1)_3 = 1 / gamma and its score is 1 - c / gamma, the lowest of all."""
    x, w = random_problem(seed=6)
    x[:, 3] = 0
    second = x.T @ x / x.shape[0]
    z = newton_score(second, w, 0.5, damp=0.01)
    a = (w.T @ w) * second
    gamma = 0.01 * a.diagonal().mean()
    damped = a + gamma * torch.eye(12, dtype=torch.float64)
    lam = damped.diagonal().sum() / 12
    ainv1 = torch.linalg.solve(damped, torch.ones(12, dtype=torch.float64))
    c = lam * 0.5 * 12 / (1 + lam * ainv1.sum())
    torch.testing.assert_close(z, 1 - c * ainv1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z[3], 1 - c / gamma, rtol=1e-9, atol=1e-9)
    assert z.argmin() == 3


def test_unit_level_score_equals_the_channel_problem_with_tied_channels():
    """E^T A E: the unit score equals Newton on a problem whose 'channels' are whole heads."""
    x, w = random_problem(d=12, seed=7)
    second = x.T @ x / x.shape[0]
    z = newton_score(second, w, 0.5, damp=0.0, unit_size=3)
    a = (w.T @ w) * second
    e = torch.zeros(12, 4, dtype=torch.float64)
    e[torch.arange(12), torch.arange(12) // 3] = 1
    au = e.T @ a @ e
    ainv1 = torch.linalg.solve(au, torch.ones(4, dtype=torch.float64))
    lam = au.diagonal().sum() / 4
    closed = 1 - lam * 0.5 * 4 / (1 + lam * ainv1.sum()) * ainv1
    torch.testing.assert_close(z, closed, rtol=1e-9, atol=1e-9)


def test_unit_level_score_finds_the_best_head_more_often_than_the_channel_mean():
    """Brute force over which head to remove: the unit-level Newton score picks the head whose
    removal error ||X (E_h o W)||^2 is smallest at least as often as the paper's channel mean, and
    with a lower average excess error, on random layers with correlated channels."""
    hits = {"unit": 0, "mean": 0}
    excess = {"unit": 0.0, "mean": 0.0}
    heads, hd = 4, 3
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        mix = torch.randn(heads * hd, heads * hd, generator=g, dtype=torch.float64)
        x = torch.randn(64, heads * hd, generator=g, dtype=torch.float64) @ mix
        w = torch.randn(5, heads * hd, generator=g, dtype=torch.float64)
        a = (w.T @ w) * (x.T @ x)
        errors = torch.stack([a[h * hd:(h + 1) * hd, h * hd:(h + 1) * hd].sum() for h in range(heads)])
        best = errors.min()
        second = x.T @ x / 64
        picks = {"unit": newton_score(second, w, 0.75, unit_size=hd).argmin(),
                 "mean": newton_score(second, w, 0.75).reshape(heads, hd).mean(1).argmin()}
        for name, pick in picks.items():
            hits[name] += int(errors[pick] == best)
            excess[name] += float(errors[pick] / best - 1)
    assert hits["unit"] >= hits["mean"]
    assert excess["unit"] < excess["mean"]


def test_centred_score_solves_eq3_on_the_centred_data():
    """centred=True: z minimises Eq. 3 with the mean-removed tokens (a direct least-squares solve over tokens)."""
    g = torch.Generator().manual_seed(3)
    n, heads, head_dim, hidden, channels = 300, 2, 3, 5, 7
    xa = torch.randn(n, heads * head_dim, generator=g, dtype=torch.float64) + 1.5
    xm = torch.randn(n, channels, generator=g, dtype=torch.float64) @ torch.randn(channels, channels, generator=g,
                                                                               dtype=torch.float64) - 0.7
    wa = torch.randn(hidden, heads * head_dim, generator=g, dtype=torch.float64)
    wm = torch.randn(hidden, channels, generator=g, dtype=torch.float64)
    stats = LayerStats(*(InputStats(x.T @ x, x.sum(0), n) for x in (xa, xm)))
    ratio = 0.4
    inputs = CriterionInputs(0, stats, wa, wm, AttentionLayout(heads, heads, head_dim), ratio)
    got = score(inputs, damp=0.0, centred=True)

    def direct(x, w):
        xc = x - x.mean(0)
        d = x.shape[1]
        # rows over (token, output): the output lost when u = 1 - z of each channel goes
        rows = (xc[:, None, :] * w[None, :, :]).reshape(-1, d) / n ** 0.5
        a = rows.T @ rows
        lam = a.diagonal().sum() / d
        system = torch.cat([rows, lam.sqrt() * torch.ones(1, d, dtype=torch.float64)])
        target = torch.cat([torch.zeros(len(rows), dtype=torch.float64),
                            (lam.sqrt() * ratio * d).reshape(1)])  # 1^T u = D - r = ratio * D
        return 1 - torch.linalg.lstsq(system, target[:, None]).solution[:, 0]

    torch.testing.assert_close(got.channels, direct(xm, wm), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(got.heads, direct(xa, wa).reshape(heads, head_dim).mean(1), rtol=1e-7, atol=1e-8)
    uncentred = score(inputs, damp=0.0)
    assert not torch.allclose(uncentred.channels, got.channels, atol=1e-3)  # the means matter here
