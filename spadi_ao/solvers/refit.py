"""Least-squares refits on frozen supports: the dictionary by MOD's closed form, the codes by conjugate gradients.

Both the fast solver and the Procrustes solver end with them. Once the supports are chosen, the dictionary
update minimises ``||A - D C||_F`` exactly and the code update monotonically, so the error never rises above
the solution they start from. A refit dictionary is no longer orthonormal: the best codes on the same
supports then are least-squares coefficients, not the projections thresholding keeps.
"""

from __future__ import annotations

import torch

from spadi_ao.solvers.codes import column_blocks, dense_block, sparse_code_products

__all__ = ["least_squares_dictionary", "refit", "refit_codes"]


def least_squares_dictionary(
    signals: torch.Tensor, indices: torch.Tensor, coefficients: torch.Tensor, current: torch.Tensor
) -> torch.Tensor:
    """``argmin_D ||A - D C||_F``: ``A C^T (C C^T)^-1``; atoms no column uses keep their current value.

    A singular ``C C^T`` (codes of two atoms proportional everywhere) skips the step: the current
    dictionary is kept, which keeps the objective monotone.
    """
    cross, gram = sparse_code_products(signals, indices, coefficients, current.shape[1], signals.dtype, with_gram=True)
    diagonal = torch.diagonal(gram)
    used = diagonal > 0
    ridge = torch.finfo(gram.dtype).eps * diagonal.mean().clamp_min(torch.finfo(gram.dtype).tiny)
    gram = gram + torch.diag(torch.where(used, ridge, torch.ones_like(diagonal)))
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return current
    dictionary = torch.cholesky_solve(cross.T, factor).T
    return torch.where(used.unsqueeze(0), dictionary, current)


def _conjugate_gradients(
    gram: torch.Tensor, correlations: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor, iterations: int
) -> torch.Tensor:
    """CG on each column's normal equations ``G c = D^T a`` restricted to its support, columns side by side."""
    residual = mask * (correlations - gram @ codes)
    direction = residual.clone()
    squared = residual.pow(2).sum(0)
    tiny = torch.finfo(codes.dtype).tiny
    for _ in range(iterations):
        product = mask * (gram @ direction)
        curvature = (direction * product).sum(0)
        step = torch.where(curvature > tiny, squared / curvature.clamp_min(tiny), torch.zeros_like(curvature))
        codes.add_(step * direction)
        residual.sub_(step * product)
        new_squared = residual.pow(2).sum(0)
        direction = (
            residual
            + torch.where(squared > tiny, new_squared / squared.clamp_min(tiny), torch.zeros_like(squared)) * direction
        )
        squared = new_squared
    return codes


def refit_codes(
    signals: torch.Tensor, dictionary: torch.Tensor, indices: torch.Tensor, coefficients: torch.Tensor, iterations: int
) -> torch.Tensor:
    """Least-squares coefficients on the fixed supports, warm-started from ``coefficients``; a block of columns
    at a time, each densified (k x c) only while it is refitted."""
    k = dictionary.shape[1]
    gram = dictionary.T @ dictionary
    refitted = torch.empty_like(coefficients)
    for block in column_blocks(signals.shape[1], k):
        codes = dense_block(indices[block], coefficients[block], k, signals.dtype).T
        mask = dense_block(indices[block], torch.ones_like(coefficients[block]), k, signals.dtype).T
        codes = _conjugate_gradients(gram, dictionary.T @ signals[:, block], codes, mask, iterations)
        refitted[block] = codes.T.gather(1, indices[block])
    return refitted


def refit(
    signals: torch.Tensor,
    dictionary: torch.Tensor,
    indices: torch.Tensor,
    coefficients: torch.Tensor,
    steps: int,
    cg_iterations: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``steps`` dictionary / code refits on the supports ``indices``, then unit-norm atoms (the codes rescaled to
    match): ``(dictionary, coefficients)``. ``coefficients`` is handed over: with no step it is rescaled in place.

    The error is left to the caller: each step lowers it, and measuring it costs a GEMM as large as the step's own.
    """
    for _ in range(steps):
        dictionary = least_squares_dictionary(signals, indices, coefficients, dictionary)
        coefficients = refit_codes(signals, dictionary, indices, coefficients, cg_iterations)
    norms = dictionary.norm(dim=0).clamp_min(torch.finfo(signals.dtype).tiny)
    for block in column_blocks(signals.shape[1], indices.shape[1]):
        coefficients[block] *= norms[indices[block]]
    return dictionary / norms, coefficients
