"""How far to shrink a calibration Gram toward its diagonal, estimated from the calibration data alone.

The whitened objective trusts every correlation in ``G``; correlations the calibration text measured
poorly (or never excited) then steer the fit. Shrinking toward ``diag(G)`` trades them for per-feature
energy. The amount is the Schaefer-Strimmer / Ledoit-Wolf estimate for a diagonal target, with
*sequences* as the observations: tokens inside a sequence are strongly dependent, so the variance of
the mean Gram is measured across sequences, which is what changes when the text changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spadi_ao.solvers.whitening import BLOCK_ROWS

__all__ = ["SequenceMoments", "diagonal_shrinkage_intensity", "squared_norms"]


@dataclass
class SequenceMoments:
    """Running sums over sequences ``b`` of their mean Grams ``g_b = X_b^T X_b / T_b``."""

    count: int = 0
    sum_squared_norm: float = 0.0
    """sum_b ||g_b||_F^2"""
    sum_squared_diagonal: float = 0.0
    """sum_b ||diag(g_b)||^2"""

    def add(self, sequence_gram: torch.Tensor) -> None:
        self.add_norms(*squared_norms(sequence_gram))

    def add_norms(self, squared_norm: float, squared_diagonal: float) -> None:
        """One sequence, given by ``||g_b||_F^2`` and ``||diag(g_b)||^2`` (computed blockwise by the collector)."""
        self.count += 1
        self.sum_squared_norm += squared_norm
        self.sum_squared_diagonal += squared_diagonal


def squared_norms(matrix: torch.Tensor, divisor: float = 1.0) -> tuple[float, float]:
    """``||M / d||_F^2`` and ``||diag(M / d)||^2`` in float64, a block of rows at a time: a wide layer's
    Gram (512 MiB at 8192 inputs) is never copied whole."""
    total = sum(float((rows.to(torch.float64) / divisor).pow_(2).sum()) for rows in matrix.split(BLOCK_ROWS))
    diagonal = float((torch.diagonal(matrix).to(torch.float64) / divisor).pow_(2).sum())
    return total, diagonal


def diagonal_shrinkage_intensity(mean_gram: torch.Tensor, moments: SequenceMoments, divisor: float = 1.0) -> float:
    """``lambda*`` in ``(1 - lambda) G + lambda diag(G)``: estimated off-diagonal variance over signal.

    ``sum_{i != j} Var(g_ij) / sum_{i != j} g_ij^2`` with ``Var`` the variance of the mean over the
    ``count`` sequences; clipped to [0, 1]. Fewer than two sequences give no estimate: 0. The mean Gram
    is ``mean_gram / divisor``, so a running sum can be passed without copying it.
    """
    count = moments.count
    if count < 2:
        return 0.0
    squared_norm, squared_diagonal = squared_norms(mean_gram, divisor)
    off_signal = squared_norm - squared_diagonal
    if off_signal <= 0.0:
        return 0.0
    off_spread = (moments.sum_squared_norm - moments.sum_squared_diagonal) - count * off_signal
    variance_of_mean = max(off_spread, 0.0) / (count * (count - 1))
    return min(1.0, variance_of_mean / off_signal)
