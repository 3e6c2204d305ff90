"""Compensation: correct the kept input columns of an output projection after others are removed.

Every compensation is one entry of ``REGISTRY``: its name, its options (a dataclass whose fields
are PruneOptions fields, with declared types), the input statistics it reads, how it refits a
projection, and the calibration error each removal leaves after it (``removal_errors``, what the
``compensated-error`` allocation compares). Adding one is adding an entry.

``least-squares``, paper Eq. 9-11 (Theorem 3): with G = X^T X, the update dW that zeroes the
pruned rows P of W (paper layout) and minimises ||X dW||^2 is dW = -G^-1[:, P] (G^-1[P, P])^-1 W_P,
the group OBS update. On the kept rows K this equals the least-squares refit

    W'_K = W_K + G_KK^-1 G_KP W_P,

i.e. the kept channels take over what the removed ones contributed, as well as they linearly can.
That form needs one solve with the kept block instead of a full inverse, so it is what we compute
(the test suite checks it against Eq. 11 literally and against a direct least-squares solve).
Remark 5's damping adds ``damp * mean(diag G)`` to the diagonal (default 0.01, as SparseGPT).

``affine``: the same fit with an intercept. Least squares of W x + b0 by W'_K x_K + b over the
calibration tokens gives W'_K = W_K + C_KK^-1 C_KP W_P on the centred covariance
C = E[x x^T] - mu mu^T, and b = b0 + W_P mu_P - (W'_K - W_K) mu_K. The ridge gamma * mean(diag C)
(``compensation_damp`` = gamma) shrinks the refit towards W_K: gamma -> infinity is exactly FLAP's
``bias`` (b += W_P mu_P, kept columns untouched), gamma = 0 the unregularised affine fit.

``bias`` (FLAP's) and ``none`` need no solve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from numprune.adapters.base import projection_weight
from numprune.calibrate import InputStats


@dataclass(frozen=True)
class Damped:
    """Ridge added to the covariance's diagonal, relative to its mean diagonal."""

    compensation_damp: float = 0.01


@dataclass(frozen=True)
class NoOptions:
    pass


Fit = tuple[torch.Tensor, torch.Tensor | None]  # the new kept columns [out, K], the bias shift [out] or None
LayerFits = tuple[Fit, Fit]  # a layer's: its attention output projection's, its MLP output projection's


@dataclass(frozen=True)
class Compensation:
    fit: Callable[[torch.Tensor, InputStats, torch.Tensor, object], Fit]
    removal_errors: Callable[[torch.Tensor, InputStats, torch.Tensor, object], torch.Tensor]
    options: type = NoOptions
    needs: tuple[str, ...] = ()  # InputStats fields it reads; empty: no statistics at all
    description: str = ""  # one line: the command line's help lists it


def least_squares(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The refitted kept columns of ``weight`` ([out, D], torch layout) given inputs' Gram ``gram``."""
    g = _damped(gram, damp)
    pruned = _complement(keep, g.shape[0])
    w = weight.double()
    if len(pruned) == 0:
        return weight[:, keep].clone()
    chol = torch.linalg.cholesky(g[keep][:, keep])
    update = torch.cholesky_solve(g[keep][:, pruned] @ w[:, pruned].T, chol)  # [K, out]
    return (w[:, keep] + update.T).to(weight.dtype)


def centred_covariance(stats: InputStats) -> torch.Tensor:
    """C = E[x x^T] - mu mu^T."""
    mean = stats.mean
    return stats.second_moment - torch.outer(mean, mean)


def affine(weight: torch.Tensor, stats: InputStats, keep: torch.Tensor, damp: float) -> Fit:
    """Kept columns refitted on the centred covariance, and the intercept that goes with them."""
    new = least_squares(weight, centred_covariance(stats), keep, damp)
    pruned = _complement(keep, weight.shape[1])
    mean = stats.mean
    shift = weight[:, pruned].double() @ mean[pruned] - (new.double() - weight[:, keep].double()) @ mean[keep]
    return new, shift.to(weight.dtype)


def bias_shift(weight: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: W[:, P] E[x_P], the removed inputs' mean contribution."""
    pruned = _complement(keep, weight.shape[1])
    return (weight[:, pruned].double() @ mean[pruned].double()).to(weight.dtype)


def refit_errors(weight: torch.Tensor, covariance: torch.Tensor, order: torch.Tensor, damp: float) -> torch.Tensor:
    """errors[k]: the ridge objective left after removing ``order[:k]`` and refitting the rest on ``covariance``.

    With M = covariance + ridge I reordered so that ``order`` is read backwards (the inputs removed
    first come last) and M = L L^T, the trailing k x k block of L is the Cholesky factor of the
    Schur complement S_k + ridge I of the kept block, and the columns of W L over the removed
    inputs are those of W_P L_PP; so one factorisation gives tr(W_P S_k W_P^T) for every k at once.
    S_k = M_PP - M_PK (M_KK)^-1 M_KP with the ridge on the kept block only: the minimum of
    E||W_P x_P - dW_K x_K||^2 + ridge ||dW_K||^2, which -> tr(W_P C_PP W_P^T) as ridge -> infinity.
    """
    reverse = order.flip(0)
    m = _damped(covariance, damp)[reverse][:, reverse]
    ridge = m.diagonal() - covariance.double().diagonal()[reverse]
    w = weight.double()[:, reverse]
    columns = (w @ torch.linalg.cholesky(m)).pow(2).sum(0) - ridge * w.pow(2).sum(0)
    return torch.cat([columns.new_zeros(1), columns.flip(0).cumsum(0)])


def kept_errors(weight: torch.Tensor, covariance: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """errors[k] = tr(W_P cov_PP W_P^T) for P = ``order[:k]``: the error when the kept columns stay as they are."""
    w = weight.double()[:, order]
    quadratic = (w.T @ w) * covariance.double()[order][:, order]
    return torch.cat([quadratic.new_zeros(1), quadratic.cumsum(0).cumsum(1).diagonal()])


REGISTRY: dict[str, Compensation] = {
    "least-squares": Compensation(
        fit=lambda w, s, keep, o: (least_squares(w, s.gram, keep, o.compensation_damp), None),
        removal_errors=lambda w, s, order, o: refit_errors(w, s.second_moment, order, o.compensation_damp),
        options=Damped, needs=("gram",), description="refit the kept columns by least squares (ridge: damping)"),
    "affine": Compensation(
        fit=lambda w, s, keep, o: affine(w, s, keep, o.compensation_damp),
        removal_errors=lambda w, s, order, o: refit_errors(w, centred_covariance(s), order, o.compensation_damp),
        options=Damped, needs=("gram", "total"),
        description="least squares with an intercept, on the centred covariance"),
    "bias": Compensation(
        fit=lambda w, s, keep, o: (w[:, keep].clone(), bias_shift(w, s.mean, keep)),
        removal_errors=lambda w, s, order, o: kept_errors(w, centred_covariance(s), order),
        needs=("gram", "total"), description="FLAP's: the removed inputs' mean contribution moves into the bias"),
    "none": Compensation(
        fit=lambda w, s, keep, o: (w[:, keep].clone(), None),
        removal_errors=lambda w, s, order, o: kept_errors(w, s.second_moment, order),
        description="the kept columns stay as they are"),
}
COMPENSATIONS = tuple(REGISTRY)


@contextmanager
def applied(linears: Sequence[torch.nn.Module], kept: Sequence[torch.Tensor], fits: Sequence[Fit]) -> Iterator[None]:
    """While the block runs, ``linears`` compute what their fits make of them (``apply``); after it, what they did
    before, exactly (their weights and biases are put back)."""
    saved = [(projection_weight(linear).detach().clone(), linear.bias) for linear in linears]
    for linear in linears:
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    try:
        for linear, keep, fit in zip(linears, kept, fits):
            apply(linear, keep, fit)
        yield
    finally:
        with torch.no_grad():
            for linear, (weight, bias) in zip(linears, saved):
                projection_weight(linear).copy_(weight)
                linear.bias = bias


def apply(linear: torch.nn.Module, keep: torch.Tensor, fit: Fit) -> None:
    """Write the fitted kept input columns (and bias shift) into ``linear`` and zero the removed ones, in place.

    The layer then computes exactly what the shrunk layer will: the removed inputs no longer count.
    The fit (computed where the statistics are) lands on the weight's own device, in its own dtype.
    A bias shift creates the bias if there is none.
    """
    new, shift = fit
    with torch.no_grad():
        weight = projection_weight(linear)
        weight.zero_()
        weight[:, keep.to(weight.device)] = new.to(weight)
        if shift is not None:
            if linear.bias is None:
                linear.bias = torch.nn.Parameter(weight.new_zeros(weight.shape[0]))
            linear.bias += shift.to(linear.bias)


def _damped(matrix: torch.Tensor, damp: float) -> torch.Tensor:
    m = matrix.double()
    return m + damp * m.diagonal().mean() * torch.eye(m.shape[0], dtype=torch.float64, device=m.device)


def _complement(keep: torch.Tensor, dim: int) -> torch.Tensor:
    mask = torch.ones(dim, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return mask.nonzero().flatten()
