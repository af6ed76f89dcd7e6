"""Honest byte accounting: a compression ratio becomes ``k, s`` (or a rank) from the bytes really stored.

``compression_ratio`` is ``1 - stored_bytes / dense_bytes`` where the dense weight is counted in its own
dtype and the stored side counts every tensor the compressed weight holds: dictionary, code values,
the position bitmask and any quantisation scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spadi_ao.format import bitmask_bytes

__all__ = [
    "DictionaryBudget",
    "LowRankBudget",
    "dictionary_bytes",
    "low_rank_bytes",
    "dictionary_budget",
    "low_rank_budget",
    "paper_ratio",
    "atom_limit",
]


def dictionary_bytes(out_features: int, in_features: int, k: int, s: int, element_size: int) -> int:
    """Bytes of dictionary ``(k, in)``, values ``(out, s)`` and bitmask ``(out, ceil(k/8))``."""
    return k * in_features * element_size + out_features * s * element_size + out_features * bitmask_bytes(k)


def low_rank_bytes(out_features: int, in_features: int, rank: int, element_size: int) -> int:
    return rank * (in_features + out_features) * element_size


def paper_ratio(out_features: int, in_features: int, k: int, s: int) -> float:
    """The paper's parameter-count ratio ``1 - (k*in + s*out) / (out*in)``: positions not counted.

    Reported only so results line up with the paper's tables; the honest ratio is smaller.
    """
    return 1.0 - (k * in_features + s * out_features) / (out_features * in_features)


@dataclass(frozen=True)
class DictionaryBudget:
    out_features: int
    in_features: int
    k: int
    s: int
    element_size: int

    @property
    def dense_bytes(self) -> int:
        return self.out_features * self.in_features * self.element_size

    @property
    def stored_bytes(self) -> int:
        return dictionary_bytes(self.out_features, self.in_features, self.k, self.s, self.element_size)

    @property
    def compression_ratio(self) -> float:
        return 1.0 - self.stored_bytes / self.dense_bytes

    @property
    def paper_ratio(self) -> float:
        return paper_ratio(self.out_features, self.in_features, self.k, self.s)


@dataclass(frozen=True)
class LowRankBudget:
    out_features: int
    in_features: int
    rank: int
    element_size: int

    @property
    def dense_bytes(self) -> int:
        return self.out_features * self.in_features * self.element_size

    @property
    def stored_bytes(self) -> int:
        return low_rank_bytes(self.out_features, self.in_features, self.rank, self.element_size)

    @property
    def compression_ratio(self) -> float:
        return 1.0 - self.stored_bytes / self.dense_bytes


def dictionary_budget(
    out_features: int,
    in_features: int,
    compression_ratio: float,
    rho: float,
    element_size: int,
    max_atoms: Optional[int] = None,
) -> DictionaryBudget:
    """Largest ``k`` with ``s = round(k / rho)`` inside the budget, then ``s`` grown into what is left.

    ``max_atoms`` caps ``k`` (orthonormal atoms: at most ``in_features``); the bytes a capped ``k`` leaves
    go to ``s``. The result never exceeds ``(1 - compression_ratio) * dense`` bytes. Raises if no ``k, s >= 1`` fits.
    """
    allowed = int((1.0 - compression_ratio) * out_features * in_features * element_size)

    def fits(k: int, s: int) -> bool:
        return dictionary_bytes(out_features, in_features, k, s, element_size) <= allowed

    def s_for(k: int) -> int:
        return max(1, min(k, round(k / rho)))

    if not fits(1, 1):
        raise ValueError(
            f"compression_ratio={compression_ratio} leaves {allowed} bytes for a {out_features}x{in_features} layer, "
            "less than one atom and one code (k >= 1, s >= 1); use a smaller compression_ratio"
        )
    lo, hi = 1, 1
    while fits(hi * 2, s_for(hi * 2)):  # bytes grow monotonically in k: bracket, then bisect
        hi *= 2
    lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid, s_for(mid)) else (lo, mid)
    k = lo if max_atoms is None else min(lo, max_atoms)
    spare = allowed - dictionary_bytes(out_features, in_features, k, 0, element_size)
    s = max(s_for(k), min(k, spare // (out_features * element_size)))
    return DictionaryBudget(out_features, in_features, k, s, element_size)


def atom_limit(solver: str, in_features: int) -> Optional[int]:
    """The most atoms ``solver`` can use: orthonormal atoms (``"procrustes"``) number at most ``in_features``."""
    return in_features if solver == "procrustes" else None


def low_rank_budget(out_features: int, in_features: int, compression_ratio: float, element_size: int) -> LowRankBudget:
    """Largest rank whose two factors fit ``(1 - compression_ratio) * dense`` bytes."""
    allowed = int((1.0 - compression_ratio) * out_features * in_features * element_size)
    rank = min(allowed // ((in_features + out_features) * element_size), min(out_features, in_features))
    if rank < 1:
        raise ValueError(
            f"compression_ratio={compression_ratio} leaves no room for rank >= 1 in a {out_features}x{in_features} "
            "layer; use a smaller compression_ratio"
        )
    return LowRankBudget(out_features, in_features, rank, element_size)
