"""Compensation: correct the kept input columns of an output projection after others are removed.

Paper Eq. 9-11 (Theorem 3): with G = X^T X, the update dW that zeroes the pruned rows P of W
(paper layout) and minimises ||X dW||^2 is dW = -G^-1[:, P] (G^-1[P, P])^-1 W_P, the group OBS
update. On the kept rows K this equals the least-squares refit

    W'_K = W_K + G_KK^-1 G_KP W_P,

i.e. the kept channels take over what the removed ones contributed, as well as they linearly can.
That form needs one solve with the kept block instead of a full inverse, so it is what we compute
(the test suite checks it against Eq. 11 literally and against a direct least-squares solve).
Remark 5's damping adds ``damp * mean(diag G)`` to the diagonal (default 0.01, as SparseGPT).
FLAP's bias compensation (``bias``) and none are the alternatives.
"""

from __future__ import annotations

import torch

from numprune.adapters.base import projection_weight

COMPENSATIONS = ("least-squares", "bias", "none")


def least_squares(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The refitted kept columns of ``weight`` ([out, D], torch layout) given inputs' Gram ``gram``."""
    g = gram.double()
    g = g + damp * g.diagonal().mean() * torch.eye(g.shape[0], dtype=torch.float64)
    pruned = _complement(keep, g.shape[0])
    w = weight.double()
    if len(pruned) == 0:
        return weight[:, keep].clone()
    chol = torch.linalg.cholesky(g[keep][:, keep])
    update = torch.cholesky_solve(g[keep][:, pruned] @ w[:, pruned].T, chol)  # [K, out]
    return (w[:, keep] + update.T).to(weight.dtype)


def apply(linear: torch.nn.Module, keep: torch.Tensor, gram: torch.Tensor | None, damp: float = 0.01) -> None:
    """Write the compensated kept input columns into ``linear`` and zero the removed ones, in place.

    With ``gram=None`` the kept columns are left as they are (no compensation). Either way the
    layer then computes exactly what the shrunk layer will: the removed inputs no longer count.
    """
    with torch.no_grad():
        weight = projection_weight(linear)
        new = least_squares(weight, gram, keep, damp) if gram is not None else weight[:, keep].clone()
        weight.zero_()
        weight[:, keep] = new


def add_bias(linear: torch.nn.Module, keep: torch.Tensor, mean: torch.Tensor) -> None:
    """FLAP's bias compensation: the removed inputs' mean contribution moves into the bias.

    b += W[:, P] E[x_P], then the removed columns are zeroed. Creates the bias if there is none.
    """
    with torch.no_grad():
        weight = projection_weight(linear)
        pruned = _complement(keep, weight.shape[1])
        shift = (weight[:, pruned].double() @ mean[pruned].double()).to(weight.dtype)
        if linear.bias is None:
            linear.bias = torch.nn.Parameter(torch.zeros_like(shift))
        linear.bias += shift
        weight[:, pruned] = 0


def _complement(keep: torch.Tensor, dim: int) -> torch.Tensor:
    mask = torch.ones(dim, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()
