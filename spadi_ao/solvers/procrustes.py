"""Orthogonal dictionaries by alternating Procrustes and hard thresholding (COMPOT-style, arXiv 2602.15200).

Solves ``min ||A - D C||_F`` over dictionaries with orthonormal columns (``D^T D = I``, ``k <= n``) and
codes ``C`` with ``s`` non-zeros per column. Orthonormality makes both block updates closed-form:

- codes: ``||A - D C||^2 = ||A||^2 - ||D^T A||^2 + ||D^T A - C||^2``, so the best ``s``-sparse column
  keeps the ``s`` largest entries of ``D^T A`` (hard thresholding is exact; no OMP);
- dictionary: with ``C`` fixed, ``||A - D C||^2 = ||A||^2 + ||C||^2 - 2 tr(D^T A C^T)``, maximised by
  ``D = U V^T`` from the thin SVD ``A C^T = U S V^T`` (orthogonal Procrustes).

Each update is an exact minimisation of its block, so the objective never rises. The start is the
``k`` leading left singular vectors, the best orthonormal basis of that size for dense codes.

``refit_steps`` then drops the orthonormality on the final supports: least-squares dictionary and code
refits (``spadi_ao.solvers.refit``), which lower the error further and never raise it.
"""

from __future__ import annotations

import torch

from spadi_ao.solvers.codes import sparse_code_products, sparse_squared_error, squared_norm, threshold_codes
from spadi_ao.solvers.ksvd import KSVDResult, leading_left_singular_vectors
from spadi_ao.solvers.refit import refit

__all__ = ["procrustes_dictionary", "procrustes_update"]


def procrustes_update(signals: torch.Tensor, indices: torch.Tensor, coefficients: torch.Tensor, k: int) -> torch.Tensor:
    """``argmin ||A - D C||_F`` over ``D^T D = I``: ``U V^T`` of ``A C^T`` (computed in float64; n x k)."""
    cross, _ = sparse_code_products(signals, indices, coefficients, k, torch.float64)
    left, _, right = torch.linalg.svd(cross, full_matrices=False)
    return (left @ right).to(signals.dtype)


def _orthonormal_start(signals: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The leading left singular vectors, completed by an orthonormal random complement beyond the rank."""
    leading = leading_left_singular_vectors(signals, k).to(torch.float64)
    missing = k - leading.shape[1]
    if missing == 0:
        return leading.to(signals.dtype)
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randn(signals.shape[0], missing, generator=generator, dtype=torch.float64).to(signals.device)
    extra -= leading @ (leading.T @ extra)
    completed = torch.linalg.qr(torch.cat([leading, extra], dim=1)).Q
    return completed.to(signals.dtype)


def procrustes_dictionary(
    signals: torch.Tensor,
    k: int,
    s: int,
    iterations: int = 20,
    tolerance: float = 1e-6,
    seed: int = 42,
    refit_steps: int = 0,
) -> KSVDResult:
    """Dictionary (n x k, orthonormal without refits) and ``s``-sparse codes for ``signals`` (n x m); see the
    module docstring.

    Stops after ``iterations`` Procrustes / thresholding rounds, or earlier once a round lowers the
    objective by less than ``tolerance`` of its value (the supports have settled); then ``refit_steps``
    least-squares refits on those supports (unit-norm atoms).
    """
    n = signals.shape[0]
    if not 1 <= s <= k <= n:
        raise ValueError(f"need 1 <= s <= k <= n (orthonormal atoms), got s={s}, k={k}, n={n}")
    if iterations < 0 or refit_steps < 0:
        raise ValueError(f"iterations and refit_steps must be >= 0, got {iterations} and {refit_steps}")
    total = squared_norm(signals)
    dictionary = _orthonormal_start(signals, k, seed)
    indices, coefficients = threshold_codes(dictionary, signals, s)
    # on orthonormal atoms with projection codes, ||A - D C||^2 = ||A||^2 - ||C||^2
    objective = [total - squared_norm(coefficients)]
    for _ in range(iterations):
        candidate = procrustes_update(signals, indices, coefficients, k)
        new_indices, new_coefficients = threshold_codes(candidate, signals, s)
        value = total - squared_norm(new_coefficients)
        if value > objective[-1]:
            break  # only float rounding can raise it: keep the better pair
        dictionary, indices, coefficients = candidate, new_indices, new_coefficients
        objective.append(value)
        if objective[-2] - value <= tolerance * objective[-2]:
            break
    if refit_steps:
        dictionary, coefficients = refit(signals, dictionary, indices, coefficients, refit_steps)
        objective.append(sparse_squared_error(signals, dictionary, indices, coefficients))
    return KSVDResult(dictionary, indices, coefficients, objective)
