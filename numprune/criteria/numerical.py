"""The numerical score of Shen et al. (AAAI 2025), Eq. 3-7: Newton's method on a relaxed mask.

For an output projection with weight W (paper layout: rows are input channels) and calibration
inputs X, the score z in R^D minimises

    F(z) = 1/2 sum_i ||X W_i - X (z * W_i)||^2 + lambda/2 (1^T z - r)^2,   r = (1 - rho) D,

whose Hessian is H = (W W^T) o (X^T X) + lambda 11^T (o: Hadamard product). Channels with a low z
are removed first. Choices the paper leaves open (documented in docs/method.md, "Choices the paper leaves open"):

- normalisation: X^T X is divided by the token count; lambda and the damping are relative to the
  mean diagonal of A = (W W^T) o (X^T X / N), so the score does not depend on the scale of X or W;
- lambda = lambda_rel * tr(A) / D, default lambda_rel = 1: large enough that sum(z) = r holds to
  within 0.2% on SmolLM2, small enough to keep H well conditioned;
- damping: A + damp * mean(diag A) * I (default damp = 0.01, SparseGPT's choice), so channels that
  are never active still give a solvable system;
- start point z0 = 1 (the dense model); H is constant, so it is factorised once and each Newton
  step costs one triangular solve. F is quadratic, so the first step already lands on the
  minimiser; further steps (up to ``iterations``) act as iterative refinement and stop once the
  step is below ``tol``;
- no clipping to [0, 1] (Algorithm 1 has none); the ranking is what matters.

Beyond the paper, ``centred=True`` puts the centred covariance C = E[x x^T] - mu mu^T in place of
E[x x^T] in A: the error a channel's removal leaves once its mean moves into the bias, which is
the score consistent with the ``affine`` and ``bias`` compensations. The paper's uncentred score
stays the default.
"""

from __future__ import annotations

import torch

from numprune.compensate import centred_covariance
from numprune.criteria.base import CriterionInputs, LayerScores


def newton_score(second_moment: torch.Tensor, weight: torch.Tensor, keep_fraction: float, *,
                 lambda_rel: float = 1.0, damp: float = 0.01, iterations: int = 50, tol: float = 1e-12,
                 unit_size: int = 1) -> torch.Tensor:
    """Minimise Eq. 3 for one output projection; ``weight`` is in torch layout [out, D].

    With ``unit_size`` > 1, consecutive channels form a unit that has one mask variable (a head's
    channels leave together): with E the D x U indicator of units, the channel mask is E z and
    the problem keeps its form with E^T A E in place of A. Returns one score per unit, computed in float64
    where ``second_moment`` is (``weight`` must be there too).
    """
    w = weight.double()
    a = (w.T @ w) * second_moment.double()
    scale = a.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    a = a + damp * scale * torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
    if unit_size > 1:
        units = a.shape[0] // unit_size
        a = a.reshape(units, unit_size, units, unit_size).sum((1, 3))  # E^T A E
    dim = a.shape[0]
    lam = lambda_rel * a.diagonal().sum() / dim
    r = keep_fraction * dim
    chol = torch.linalg.cholesky(a + lam)  # H = A + lambda 11^T (adding a scalar adds lambda to every entry)
    z = torch.ones(dim, dtype=torch.float64, device=a.device)
    for _ in range(iterations):
        step = torch.cholesky_solve(gradient(a, lam, r, z)[:, None], chol)[:, 0]
        z = z - step
        if step.norm() <= tol * z.norm():
            break
    return z


def gradient(a: torch.Tensor, lam: torch.Tensor | float, r: float, z: torch.Tensor) -> torch.Tensor:
    """Eq. 6: A (z - 1) + lambda (1^T z - r) 1."""
    return a @ (z - 1) + lam * (z.sum() - r)


def score(inputs: CriterionInputs, *, lambda_rel: float = 1.0, damp: float = 0.01, iterations: int = 50,
          centred: bool = False) -> LayerScores:
    """Channel scores from the two Newton problems; a head scores the mean of its channels (Eq. 8)."""
    return _scores(inputs, False, centred, lambda_rel=lambda_rel, damp=damp, iterations=iterations)


def unit_score(inputs: CriterionInputs, *, lambda_rel: float = 1.0, damp: float = 0.01,
               iterations: int = 50, centred: bool = False) -> LayerScores:
    """Beyond the paper: the attention problem solved with one variable per head (E^T A E).

    The paper's head score averages channel scores that were each found as if channels left one
    by one; a head's channels leave together, and their joint effect includes the correlations
    between them. MLP channels are units already, so their scores are the paper's.
    """
    return _scores(inputs, True, centred, lambda_rel=lambda_rel, damp=damp, iterations=iterations)


def _scores(inputs: CriterionInputs, variable_per_head: bool, centred: bool, **options) -> LayerScores:
    keep = 1.0 - inputs.ratio
    layout = inputs.layout
    moment = centred_covariance if centred else (lambda s: s.second_moment)
    z_attn = newton_score(moment(inputs.stats.attention), inputs.attention_weight, keep,
                          unit_size=layout.head_dim if variable_per_head else 1, **options)
    heads = z_attn if variable_per_head else z_attn.reshape(layout.num_heads, layout.head_dim).mean(1)
    channels = newton_score(moment(inputs.stats.mlp), inputs.mlp_weight, keep, **options)
    return LayerScores(heads=heads, channels=channels)
