"""SVD-LLM's baseline: truncated SVD of the whitened weight, mapped back through the inverse factor."""

from __future__ import annotations

import torch

__all__ = ["whitened_low_rank"]


def whitened_low_rank(whitened: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` Frobenius approximation of ``whitened`` (in x out) as ``left @ right``.

    The singular values are split evenly (``sqrt``) between the factors, which keeps both on the same
    scale for later quantisation. Returns ``left`` (in x rank) and ``right`` (rank x out).
    """
    u, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
    root = sigma[:rank].sqrt()
    return u[:, :rank] * root, root.unsqueeze(1) * vh[:rank]
