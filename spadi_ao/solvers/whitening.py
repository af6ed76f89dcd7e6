"""Whitening: a factor ``U`` with ``U^T U = G`` turns output error into Frobenius error.

For a weight ``W`` (out x in) and inputs ``X`` (tokens x in) with Gram ``G = X^T X``::

    ||X (W - W_hat)^T||_F = ||U (W - W_hat)^T||_F

so fitting ``A = U W^T`` in plain Frobenius norm minimises the layer's output error on the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Whitening", "whiten", "shrink_gram"]


@dataclass(frozen=True)
class Whitening:
    """``factor`` (``U``, in x in) with ``U^T U = G_used``; ``inverse`` maps whitened atoms back."""

    factor: torch.Tensor
    inverse: torch.Tensor
    method: str
    """``"cholesky"`` or ``"eigh"`` (the fallback for Grams Cholesky rejects)."""


def shrink_gram(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - a) G + a diag(G)``: 0 keeps the data's Gram, 1 fits each input scaled by its energy only."""
    if shrinkage == 0.0:
        return gram
    return (1.0 - shrinkage) * gram + shrinkage * torch.diag(torch.diagonal(gram))


def whiten(gram: torch.Tensor, damping: float = 1e-2) -> Whitening:
    """Factor ``G + damping * mean(diag(G)) * I`` robustly; never fails for a finite symmetric Gram.

    Cholesky is tried first (float64). A Gram that is rank-deficient even after damping (fewer tokens
    than features, dead inputs, ``damping=0``) falls back to an eigendecomposition whose tiny
    eigenvalues are floored only in the *inverse*, so ``U^T U`` still equals the damped Gram.
    """
    g = gram.to(torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError("the calibration Gram has non-finite entries; check the calibration inputs")
    g = 0.5 * (g + g.T)
    n = g.shape[0]
    scale = torch.diagonal(g).mean().clamp_min(torch.finfo(torch.float64).tiny)
    damped = g + damping * scale * torch.eye(n, dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        diag = torch.diagonal(chol)
        if bool((diag > 1e-10 * diag.max()).all()):
            upper = chol.T.contiguous()
            eye = torch.eye(n, dtype=g.dtype, device=g.device)
            inverse = torch.linalg.solve_triangular(upper, eye, upper=True)
            return Whitening(upper, inverse, "cholesky")
    eigenvalues, eigenvectors = torch.linalg.eigh(damped)
    eigenvalues = eigenvalues.clamp_min(0.0)
    floor = eigenvalues.max().clamp_min(torch.finfo(torch.float64).tiny) * 1e-10
    root = eigenvalues.sqrt()
    factor = root.unsqueeze(1) * eigenvectors.T
    inverse = eigenvectors * eigenvalues.clamp_min(floor).rsqrt().unsqueeze(0)
    return Whitening(factor, inverse, "eigh")
