"""One layer end to end: shrink and whiten its Gram, size it from the budget, solve, pack.

Pure functions of (weight, Gram, config): they never touch a module, so a failure leaves the model
as it was and the same code serves the one-shot, sequential and distributed drivers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from spadi_ao.budget import dictionary_budget, low_rank_budget
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.format import pack_codes
from spadi_ao.solvers.ksvd import ksvd
from spadi_ao.solvers.lowrank import whitened_low_rank
from spadi_ao.solvers.omp import codes_to_dense
from spadi_ao.solvers.whitening import Whitening, shrink_gram, whiten
from spadi_ao.tensor import DictionaryTensor, LowRankTensor

__all__ = ["LayerReport", "compress_weight", "whitening_for"]

SOLVE_DTYPE = torch.float32


@dataclass
class LayerReport:
    name: str
    method: str
    out_features: int
    in_features: int
    dense_bytes: int
    stored_bytes: int
    compression_ratio: float
    whitened_error: float
    """``||U (W - W_hat)^T||_F / ||U W^T||_F``: relative output error on the calibration data."""
    seconds: float
    k: Optional[int] = None
    s: Optional[int] = None
    rank: Optional[int] = None
    paper_ratio: Optional[float] = None
    whitening: str = "identity"
    gram_shrinkage: float = 0.0
    calibration_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def whitening_for(gram: Optional[torch.Tensor], in_features: int, damping: float, shrinkage: float, device: torch.device) -> Whitening:
    """The whitening of a (possibly absent) Gram; no calibration means plain weight-space fitting."""
    if gram is None:
        eye = torch.eye(in_features, dtype=torch.float64, device=device)
        return Whitening(eye, eye, "identity")
    return whiten(shrink_gram(gram.to(device=device, dtype=torch.float64), shrinkage), damping)


def _relative_error(target: torch.Tensor, approximation: torch.Tensor) -> float:
    return float((target - approximation).norm() / target.norm().clamp_min(1e-30))


def compress_weight(
    name: str,
    weight: torch.Tensor,
    gram: Optional[torch.Tensor],
    config: DictionaryConfig | LowRankConfig,
    calibration_tokens: int = 0,
    shrinkage: Optional[float] = None,
) -> tuple[torch.Tensor, LayerReport]:
    """Compress one dense ``weight`` (out x in) into a Dictionary/LowRank tensor and its report."""
    start = time.perf_counter()
    out_features, in_features = weight.shape
    element_size = weight.element_size()
    if shrinkage is None:
        if config.gram_shrinkage == "auto":
            raise ValueError("gram_shrinkage='auto' needs the calibration collector; pass the estimated shrinkage")
        shrinkage = float(config.gram_shrinkage)
    whitening = whitening_for(gram, in_features, config.damping, shrinkage, weight.device)
    # A = U W^T (in x out): one column per output neuron, Frobenius error == output error.
    whitened = (whitening.factor @ weight.to(torch.float64).T).to(SOLVE_DTYPE)
    inverse = whitening.inverse.to(SOLVE_DTYPE)
    common = dict(
        name=name,
        out_features=out_features,
        in_features=in_features,
        dense_bytes=out_features * in_features * element_size,
        whitening=whitening.method,
        gram_shrinkage=shrinkage,
        calibration_tokens=calibration_tokens,
    )
    if isinstance(config, DictionaryConfig):
        budget = dictionary_budget(out_features, in_features, config.compression_ratio, config.rho, element_size)
        result = ksvd(
            whitened,
            budget.k,
            budget.s,
            iterations=config.iterations,
            power_iterations=config.power_iterations,
            seed=config.seed,
            atoms_per_step=config.atoms_per_step,
            init=config.init,
        )
        approximation = result.dictionary @ codes_to_dense(result.indices, result.coefficients, budget.k)
        atoms = (inverse @ result.dictionary).T  # D~^T: (k, in) in input space
        values, bitmask = pack_codes(result.indices, result.coefficients, budget.k)
        tensor = DictionaryTensor(atoms.to(weight.dtype).contiguous(), values.to(weight.dtype), bitmask, weight.dtype)
        report = LayerReport(
            method="cospadi",
            stored_bytes=tensor.stored_bytes(),
            compression_ratio=1.0 - tensor.stored_bytes() / common["dense_bytes"],
            whitened_error=_relative_error(whitened, approximation),
            seconds=time.perf_counter() - start,
            k=budget.k,
            s=budget.s,
            paper_ratio=budget.paper_ratio,
            **common,
        )
        return tensor, report
    if isinstance(config, LowRankConfig):
        budget = low_rank_budget(out_features, in_features, config.compression_ratio, element_size)
        left, right = whitened_low_rank(whitened, budget.rank)
        down = (inverse @ left).T  # (rank, in)
        tensor = LowRankTensor(down.to(weight.dtype).contiguous(), right.T.to(weight.dtype).contiguous(), weight.dtype)
        report = LayerReport(
            method="svd-llm",
            stored_bytes=tensor.stored_bytes(),
            compression_ratio=1.0 - tensor.stored_bytes() / common["dense_bytes"],
            whitened_error=_relative_error(whitened, left @ right),
            seconds=time.perf_counter() - start,
            rank=budget.rank,
            **common,
        )
        return tensor, report
    raise TypeError(f"config must be a DictionaryConfig or LowRankConfig, got {type(config).__name__}")
