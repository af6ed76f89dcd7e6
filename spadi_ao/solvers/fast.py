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

from spadi_ao.solvers.ksvd import KSVDResult, squared_error, svd_dictionary

__all__ = ["fast_dictionary"]


def _least_squares_dictionary(signals: torch.Tensor, codes: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``argmin_D ||A - D C||_F``: ``A C^T (C C^T)^-1``; atoms no column uses keep their current value.

    A singular ``C C^T`` (codes of two atoms proportional everywhere) skips the step: the current
    dictionary is kept, which keeps the objective monotone.
    """
    gram = codes @ codes.T
    diagonal = torch.diagonal(gram)
    used = diagonal > 0
    ridge = torch.finfo(gram.dtype).eps * diagonal.mean().clamp_min(torch.finfo(gram.dtype).tiny)
    gram = gram + torch.diag(torch.where(used, ridge, torch.ones_like(diagonal)))
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return current
    dictionary = torch.cholesky_solve((signals @ codes.T).T, factor).T
    return torch.where(used.unsqueeze(0), dictionary, current)


def _refit_codes(
    signals: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor, iterations: int
) -> torch.Tensor:
    """Conjugate gradients on every column's normal equations, restricted to its support, all at once."""
    gram = dictionary.T @ dictionary
    residual = mask * (dictionary.T @ signals - gram @ codes)
    direction = residual.clone()
    squared = residual.pow(2).sum(0)
    tiny = torch.finfo(codes.dtype).tiny
    codes = codes.clone()
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


def fast_dictionary(
    signals: torch.Tensor, k: int, s: int, steps: int = 8, cg_iterations: int = 4, seed: int = 42
) -> KSVDResult:
    """Dictionary (n x k, unit-norm atoms) and ``s``-sparse codes for ``signals`` (n x m); see the module docstring."""
    if not 1 <= s <= k:
        raise ValueError(f"need 1 <= s <= k, got s={s}, k={k}")
    dictionary = svd_dictionary(signals, k, torch.Generator().manual_seed(seed))
    correlations = dictionary.T @ signals  # (k, m)
    indices = correlations.abs().topk(s, dim=0).indices  # (s, m)
    mask = torch.zeros_like(correlations).scatter_(0, indices, 1.0)
    codes = correlations * mask
    objective = [squared_error(signals, dictionary, codes)]
    for _ in range(steps):
        dictionary = _least_squares_dictionary(signals, codes, dictionary)
        codes = _refit_codes(signals, dictionary, codes, mask, cg_iterations)
        objective.append(squared_error(signals, dictionary, codes))
    norms = dictionary.norm(dim=0).clamp_min(torch.finfo(signals.dtype).tiny)
    dictionary, codes = dictionary / norms, codes * norms.unsqueeze(1)
    indices = indices.T.contiguous()
    return KSVDResult(dictionary, indices, codes.T.gather(1, indices), objective)
