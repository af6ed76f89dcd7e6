"""A few-step alternative to K-SVD: one-shot supports, then closed-form dictionary and code refits.

1. Atoms start as the ``k`` leading left singular vectors of the whitened weight; each column (output)
   keeps the ``s`` atoms with the largest coefficients, i.e. the directions carrying most of that
   output's activation-weighted energy. On these orthonormal atoms this is exact OMP.
2. With the supports frozen, ``steps`` times: the least-squares dictionary for the current codes (MOD's
   closed form, one ``k x k`` solve), then the least-squares codes on the supports, by conjugate
   gradients warm-started from the current codes (``spadi_ao.solvers.refit``).

Both updates minimise the same objective (the dictionary exactly, CG monotonically), so the error never
rises above the one-shot solution's, and each step is a few GEMMs: no per-atom sweep and no per-column
OMP, the two loops that make a K-SVD iteration slow.
"""

from __future__ import annotations

import torch

from spadi_ao.solvers.codes import sparse_squared_error, threshold_codes
from spadi_ao.solvers.ksvd import KSVDResult, svd_dictionary
from spadi_ao.solvers.refit import refit

__all__ = ["fast_dictionary"]


def fast_dictionary(
    signals: torch.Tensor, k: int, s: int, steps: int = 8, cg_iterations: int = 4, seed: int = 42
) -> KSVDResult:
    """Dictionary (n x k, unit-norm atoms) and ``s``-sparse codes for ``signals`` (n x m); see the module docstring."""
    if not 1 <= s <= k:
        raise ValueError(f"need 1 <= s <= k, got s={s}, k={k}")
    dictionary = svd_dictionary(signals, k, torch.Generator().manual_seed(seed))
    indices, coefficients = threshold_codes(dictionary, signals, s)
    objective = [sparse_squared_error(signals, dictionary, indices, coefficients)]
    dictionary, coefficients = refit(signals, dictionary, indices, coefficients, steps, cg_iterations)
    if steps:
        objective.append(sparse_squared_error(signals, dictionary, indices, coefficients))
    return KSVDResult(dictionary, indices, coefficients, objective)
