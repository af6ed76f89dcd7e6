"""Sparse codes kept as ``(indices, coefficients)`` and used a block of columns at a time.

A shared-input group solves one whitened weight for all its members (the 1B shape's gate/up: 2048 x 16384),
and with ``k`` close to ``n`` a dense ``k x m`` code matrix, its mask or its correlations are each as large
as the weight itself. The solvers keep codes in the packed form they are stored in and densify one block of
columns at a time, so their scratch is a block's whatever the layer's width.
"""

from __future__ import annotations

from typing import Optional

import torch

from spadi_ao.solvers import BLOCK_ELEMENTS

__all__ = [
    "column_blocks",
    "dense_block",
    "sparse_code_products",
    "sparse_squared_error",
    "squared_norm",
    "threshold_codes",
]


def column_blocks(columns: int, rows: int) -> list[slice]:
    """Slices of ``columns`` holding about ``BLOCK_ELEMENTS`` entries of a ``rows``-tall matrix each."""
    step = max(1, BLOCK_ELEMENTS // max(rows, 1))
    return [slice(start, min(start + step, columns)) for start in range(0, columns, step)]


def dense_block(indices: torch.Tensor, coefficients: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The codes of some columns, ``(indices, coefficients)`` each (c, s), as a dense (c, k) matrix."""
    dense = torch.zeros(indices.shape[0], k, dtype=dtype, device=coefficients.device)
    return dense.scatter_(1, indices, coefficients.to(dtype))


def sparse_code_products(
    signals: torch.Tensor,
    indices: torch.Tensor,
    coefficients: torch.Tensor,
    k: int,
    dtype: torch.dtype,
    with_gram: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``A C^T`` (n x k) in ``dtype`` for codes ``C`` given per column of ``A`` (n x m), and ``C C^T`` (k x k)
    when ``with_gram`` (the Procrustes update needs only the first; the least-squares dictionary both)."""
    n, m = signals.shape
    cross = torch.zeros(n, k, dtype=dtype, device=signals.device)
    gram = torch.zeros(k, k, dtype=dtype, device=signals.device) if with_gram else None
    for block in column_blocks(m, n + k):
        codes = dense_block(indices[block], coefficients[block], k, dtype)  # C^T of these columns
        cross.addmm_(signals[:, block].to(dtype), codes)
        if gram is not None:
            gram.addmm_(codes.T, codes)
    return cross, gram


def sparse_squared_error(
    signals: torch.Tensor, dictionary: torch.Tensor, indices: torch.Tensor, coefficients: torch.Tensor
) -> float:
    """``||A - D C||_F^2``, accumulated in float64 over blocks of columns."""
    n, m = signals.shape
    k = dictionary.shape[1]
    total = 0.0
    for block in column_blocks(m, n + k):
        codes = dense_block(indices[block], coefficients[block], k, dictionary.dtype)
        residual = torch.addmm(signals[:, block], dictionary, codes.T, alpha=-1.0)
        total += float(torch.linalg.vector_norm(residual, dtype=torch.float64)) ** 2
    return total


def squared_norm(signals: torch.Tensor) -> float:
    """``||A||_F^2`` of a matrix in float64, a block of columns at a time (no float64 copy of ``A``)."""
    blocks = column_blocks(signals.shape[1], signals.shape[0])
    return sum(float(torch.linalg.vector_norm(signals[:, block], dtype=torch.float64)) ** 2 for block in blocks)


def threshold_codes(dictionary: torch.Tensor, signals: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column keeps its ``s`` largest correlations with the atoms: ``(indices, coefficients)``, each (m, s),
    in no particular order (the stored format sorts them by atom). On orthonormal atoms these are the best
    ``s``-sparse codes. A block of columns at a time: the (m, k) correlations never exist whole."""
    m, k = signals.shape[1], dictionary.shape[1]
    indices = torch.empty(m, s, dtype=torch.long, device=signals.device)
    coefficients = torch.empty(m, s, dtype=signals.dtype, device=signals.device)
    for block in column_blocks(m, k):
        correlations = (dictionary.T @ signals[:, block]).T  # (c, k)
        top = correlations.abs().topk(s, dim=1, sorted=False).indices  # ordering them would cost more
        indices[block], coefficients[block] = top, correlations.gather(1, top)
    return indices, coefficients
