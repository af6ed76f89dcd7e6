"""A few-step alternative to K-SVD: one-shot supports, then closed-form dictionary and code refits.

1. Atoms start as the ``k`` leading left singular vectors of the whitened weight; each column (output)
   keeps the ``s`` atoms with the largest coefficients, i.e. the directions carrying most of that
   output's activation-weighted energy. On these orthonormal atoms this is exact OMP.
2. With the supports frozen, ``steps`` times: the least-squares dictionary for the current codes (MOD's
   closed form, one ``k x k`` solve), then the least-squares codes on the supports, by conjugate
   gradients warm-started from the current codes.

Both updates minimise the same objective (the dictionary exactly, CG monotonically), so the error never
rises above the one-shot solution's, and each step is a few GEMMs: no per-atom sweep and no per-column
OMP, the two loops that make a K-SVD iteration slow.
"""

from __future__ import annotations

import torch

from spadi_ao.solvers.codes import (
    column_blocks,
    dense_block,
    sparse_code_products,
    sparse_squared_error,
    threshold_codes,
)
from spadi_ao.solvers.ksvd import KSVDResult, svd_dictionary

__all__ = ["fast_dictionary"]


def _least_squares_dictionary(
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


def _refit_codes(
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


def fast_dictionary(
    signals: torch.Tensor, k: int, s: int, steps: int = 8, cg_iterations: int = 4, seed: int = 42
) -> KSVDResult:
    """Dictionary (n x k, unit-norm atoms) and ``s``-sparse codes for ``signals`` (n x m); see the module docstring."""
    if not 1 <= s <= k:
        raise ValueError(f"need 1 <= s <= k, got s={s}, k={k}")
    dictionary = svd_dictionary(signals, k, torch.Generator().manual_seed(seed))
    indices, coefficients = threshold_codes(dictionary, signals, s)
    objective = [sparse_squared_error(signals, dictionary, indices, coefficients)]
    for _ in range(steps):
        dictionary = _least_squares_dictionary(signals, indices, coefficients, dictionary)
        coefficients = _refit_codes(signals, dictionary, indices, coefficients, cg_iterations)
        objective.append(sparse_squared_error(signals, dictionary, indices, coefficients))
    norms = dictionary.norm(dim=0).clamp_min(torch.finfo(signals.dtype).tiny)
    for block in column_blocks(signals.shape[1], indices.shape[1]):
        coefficients[block] *= norms[indices[block]]
    return KSVDResult(dictionary / norms, indices, coefficients, objective)
