"""Whitening: a factor ``U`` with ``U^T U = G`` turns output error into Frobenius error.

For a weight ``W`` (out x in) and inputs ``X`` (tokens x in) with Gram ``G = X^T X``::

    ||X (W - W_hat)^T||_F = ||U (W - W_hat)^T||_F

so fitting ``A = U W^T`` in plain Frobenius norm minimises the layer's output error on the data.

Memory: a wide layer's Gram is large (8192 inputs: 512 MiB in float64), so whitening holds one working
copy of it and nothing else of that size: shrinkage, symmetrisation and damping happen in place on that
copy, Cholesky factors it in place, and atoms are mapped back by a triangular solve instead of an
explicit inverse (or, where the factor outweighs the whitened weight, through the weight itself, so the
factor can go before the solve: ``spadi_ao.layer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["Whitening", "whiten", "shrink_gram"]

BLOCK_ROWS = 512
"""Rows per step of the blockwise passes over a Gram: bounds their scratch memory to ``BLOCK_ROWS x in``."""


@dataclass(frozen=True)
class Whitening:
    """``U`` (in x in) with ``U^T U = G_used``, kept factored: :meth:`apply` is ``U x``, :meth:`apply_inverse`
    ``U^-1 y``.

    ``"cholesky"``: ``matrix`` is ``U`` (upper triangular). ``"eigh"`` (the fallback for Grams Cholesky
    rejects): ``U = diag(roots) V^T`` with ``matrix = V``; its inverse floors tiny eigenvalues
    (``inverse_roots``), so it is the pseudo-inverse on the data's span. ``"identity"``: no Gram.
    """

    method: str
    size: int
    matrix: Optional[torch.Tensor] = None
    roots: Optional[torch.Tensor] = None
    inverse_roots: Optional[torch.Tensor] = None

    @classmethod
    def identity(cls, size: int) -> "Whitening":
        return cls("identity", size)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``U x`` (x: in x m, float64)."""
        if self.method == "cholesky":
            return self.matrix @ x
        if self.method == "eigh":
            return self.roots.unsqueeze(1) * (self.matrix.T @ x)
        return x

    def apply_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``U^-1 y`` (y: in x m), in float64: maps whitened atoms back to input space."""
        y = y.to(torch.float64)
        if self.method == "cholesky":
            return torch.linalg.solve_triangular(self.matrix, y, upper=True)
        if self.method == "eigh":
            return self.matrix @ (self.inverse_roots.unsqueeze(1) * y)
        return y

    def apply_inverse_transpose(self, y: torch.Tensor) -> torch.Tensor:
        """``U^-T y`` (y: in x m), in float64: ``U x`` for ``x = G^-1 y`` without forming ``x``, how a corrected
        sequential fit whitens its target (``spadi_ao.correction``)."""
        y = y.to(torch.float64)
        if self.method == "cholesky":
            return torch.linalg.solve_triangular(self.matrix.mT, y, upper=False)
        if self.method == "eigh":
            return self.inverse_roots.unsqueeze(1) * (self.matrix.T @ y)
        return y

    @property
    def factor(self) -> torch.Tensor:
        """``U`` as a matrix (formed on demand for eigh and identity)."""
        if self.method == "cholesky":
            return self.matrix
        return self.apply(self._eye())

    @property
    def inverse(self) -> torch.Tensor:
        """``U^-1`` as a matrix, formed on demand (in x in): for inspection; the solvers use :meth:`apply_inverse`."""
        return self.apply_inverse(self._eye())

    def _eye(self) -> torch.Tensor:
        device = self.matrix.device if self.matrix is not None else None
        return torch.eye(self.size, dtype=torch.float64, device=device)


def shrink_gram(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - a) G + a diag(G)``: 0 keeps the data's Gram, 1 fits each input scaled by its energy only."""
    if shrinkage == 0.0:
        return gram
    return _shrink_(gram.clone(), shrinkage)


def _shrink_(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    diagonal = gram.diagonal().clone()
    gram.mul_(1.0 - shrinkage).diagonal().add_(shrinkage * diagonal)
    return gram


def _all_finite(matrix: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(rows).all()) for rows in matrix.split(BLOCK_ROWS))


def _symmetrise_(matrix: torch.Tensor) -> None:
    """``M <- (M + M^T) / 2`` in place, a block of rows at a time (no second in x in matrix)."""
    size = matrix.shape[0]
    for start in range(0, size, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, size)
        # Rows start:stop left of the diagonal (and the diagonal block) still hold their original values, and
        # so do the columns start:stop above them: average them, then mirror into the upper triangle.
        block = (matrix[start:stop, :stop] + matrix[:stop, start:stop].T).mul_(0.5)
        matrix[start:stop, :stop] = block
        matrix[:start, start:stop] = block[:, :start].T


def _damped(gram: torch.Tensor, damping: float, shrinkage: float, overwrite: bool) -> torch.Tensor:
    """``shrink(G) + damping * mean(diag) * I``, symmetrised, in float64: in ``gram`` itself or in its only copy."""
    damped = gram if overwrite else gram.to(torch.float64, copy=True)
    if shrinkage != 0.0:
        _shrink_(damped, shrinkage)
    if not _all_finite(damped):
        raise ValueError("the calibration Gram has non-finite entries; check the calibration inputs")
    _symmetrise_(damped)
    scale = torch.diagonal(damped).mean().clamp_min(torch.finfo(torch.float64).tiny)
    damped.diagonal().add_(damping * scale)
    return damped


def _cholesky_upper_(damped: torch.Tensor) -> bool:
    """Overwrite the symmetric ``damped`` with ``U`` (upper, ``U^T U = damped``); False if it is not safely positive
    definite.

    LAPACK factors the column-major view ``damped^T`` in place into its lower factor ``L``, whose row-major
    storage is ``U = L^T``: no second matrix, and the same bits as ``cholesky(damped).T``.
    """
    lower = damped.mT
    _, info = torch.linalg.cholesky_ex(lower, out=(lower, torch.empty((), dtype=torch.int32, device=damped.device)))
    if int(info) != 0:
        return False
    diag = torch.diagonal(damped)
    return bool((diag > 1e-10 * diag.max()).all())


def whiten(gram: torch.Tensor, damping: float = 1e-2, shrinkage: float = 0.0, overwrite: bool = False) -> Whitening:
    """Factor ``shrink(G) + damping * mean(diag) * I`` robustly; never fails for a finite symmetric Gram.

    ``shrinkage`` is :func:`shrink_gram`'s, applied to the working copy. Cholesky is tried first
    (float64). A Gram that is rank-deficient even after damping (fewer tokens than features, dead inputs,
    ``damping=0``) falls back to an eigendecomposition whose tiny eigenvalues are floored only in the
    *inverse*, so ``U^T U`` still equals the damped Gram.

    ``overwrite=True`` (a float64 Gram the caller is done with) factors ``gram`` in place, so whitening
    needs no in x in memory of its own. With ``damping > 0`` the Gram of any real inputs is positive
    definite and Cholesky cannot fail; with ``damping == 0`` a copy is kept for the fallback anyway.
    """
    size = gram.shape[0]
    in_place = overwrite and damping > 0 and gram.dtype == torch.float64
    damped = _damped(gram, damping, shrinkage, in_place)
    if _cholesky_upper_(damped):
        return Whitening("cholesky", size, damped)
    if in_place:
        raise ValueError(
            "the damped Gram is not positive definite, which no Gram of real inputs is; it was whitened in place "
            "(overwrite=True), which has no fallback: whiten a copy"
        )
    del damped  # the failed factorisation overwrote it
    eigenvalues, eigenvectors = torch.linalg.eigh(_damped(gram, damping, shrinkage, False))
    eigenvalues = eigenvalues.clamp_min(0.0)
    floor = eigenvalues.max().clamp_min(torch.finfo(torch.float64).tiny) * 1e-10
    return Whitening("eigh", size, eigenvectors, eigenvalues.sqrt(), eigenvalues.clamp_min(floor).rsqrt())
