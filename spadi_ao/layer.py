"""One layer (or one group sharing a dictionary) end to end: shrink and whiten the Gram, size from the
budget, solve, pack.

Pure functions of (weight, Gram, config): they never touch a module, so a failure leaves the model
as it was and the same code serves the one-shot, sequential and distributed drivers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from spadi_ao.budget import atom_limit, dictionary_budget, low_rank_budget
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.correction import corrected_whitened_weight, correction_ridge
from spadi_ao.format import pack_codes
from spadi_ao.grouping import average_gram, split_bytes
from spadi_ao.integrations.torchao import quantize_dictionary
from spadi_ao.solvers import BLOCK_ELEMENTS
from spadi_ao.solvers.codes import sparse_squared_error
from spadi_ao.solvers.fast import fast_dictionary
from spadi_ao.solvers.ksvd import KSVDResult, ksvd
from spadi_ao.solvers.lowrank import whitened_low_rank
from spadi_ao.solvers.omp import codes_to_dense
from spadi_ao.solvers.procrustes import procrustes_dictionary
from spadi_ao.solvers.whitening import Whitening, whiten
from spadi_ao.tensor import DictionaryTensor, LowRankTensor, stored_bytes

if TYPE_CHECKING:
    from spadi_ao.calibration import GramCollector

__all__ = [
    "LayerReport",
    "compress_linear",
    "compress_weight",
    "compress_group",
    "resolve_shrinkage",
    "whiten_group",
    "solve_dictionary",
    "whitening_for",
    "span_coordinates",
    "atoms_in_input_space",
]

SOLVE_DTYPE = torch.float32

SPAN_RCOND = 1e-5
"""Relative singular value below which a direction of the (float32) whitened weight is damped as rounding, not
span, when atoms map back through the weight: it carries under 1e-10 of the weight's energy, and the damping
bounds how far the float32 rounding of ``A`` can move an atom (about 1e-7 / SPAN_RCOND of its norm)."""


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
    group: Optional[str] = None
    """The dictionary-sharing group (None: the layer's own dictionary). ``stored_bytes`` then counts the
    layer's codes plus its share of the shared dictionary, in proportion to its outputs."""

    def to_dict(self) -> dict:
        return asdict(self)


def whitening_for(
    gram: Optional[torch.Tensor],
    in_features: int,
    damping: float,
    shrinkage: float,
    device: torch.device,
    overwrite: bool = False,
) -> Whitening:
    """The whitening of a (possibly absent) Gram; no calibration means plain weight-space fitting.

    ``overwrite``: the caller is done with ``gram`` and it may be factored in place (see ``whiten``).
    """
    if gram is None:
        return Whitening.identity(in_features)
    return whiten(gram.to(device=device, dtype=torch.float64), damping, shrinkage, overwrite)


def _relative_error(target: torch.Tensor, approximation: torch.Tensor) -> float:
    return float((target - approximation).norm() / target.norm().clamp_min(1e-30))


def _shrinkage(config: DictionaryConfig | LowRankConfig, shrinkage: Optional[float]) -> float:
    if shrinkage is not None:
        return shrinkage
    if config.gram_shrinkage == "auto":
        return 0.0  # no sequence statistics reached this layer: nothing to estimate from
    return float(config.gram_shrinkage)


def whiten_group(
    weights: Sequence[torch.Tensor],
    grams: Sequence[Optional[torch.Tensor]],
    config: DictionaryConfig | LowRankConfig,
    shrinkages: Optional[Sequence[Optional[float]]] = None,
    overwrite_gram: bool = False,
    crosses: Optional[Sequence[torch.Tensor]] = None,
) -> tuple[Whitening, torch.Tensor, float]:
    """The whitening of the members' averaged Gram and the stacked whitened weight ``U [W_1; W_2; ...]^T``.

    One member is the plain per-layer case. Returns ``(whitening, A (in x sum of outs), shrinkage)``.
    ``overwrite_gram``: the caller is done with the (single) Gram; it becomes the whitening's factor.
    ``crosses``: each member's dense-model outputs against its inputs (``spadi_ao.correction``); ``A`` is then
    the members' corrected weights whitened, which needs one Gram for all (members reading the same input).
    """
    in_features = {weight.shape[1] for weight in weights}
    if len(in_features) != 1 or len({weight.dtype for weight in weights}) != 1:
        raise ValueError("layers that share a dictionary need the same in_features and dtype")
    shrinkage = sum(_shrinkage(config, value) for value in (shrinkages or [None] * len(weights))) / len(weights)
    gram = average_gram(grams)
    ridge = None
    if crosses is not None:
        if gram is None or any(other is not grams[0] for other in grams):
            raise ValueError("a fit corrected to the dense outputs needs one Gram shared by every member")
        ridge = correction_ridge(gram, shrinkage, config.damping)  # before the factor overwrites the Gram
    whitening = whitening_for(gram, in_features.pop(), config.damping, shrinkage, weights[0].device, overwrite_gram)
    del gram
    if crosses is None:
        return whitening, _whitened_weight(whitening, weights), shrinkage
    return whitening, corrected_whitened_weight(whitening, weights, crosses, ridge, shrinkage, SOLVE_DTYPE), shrinkage


def _input_space(whitening: Whitening, whitened: torch.Tensor, outs: Sequence[int], dtype: torch.dtype) -> list:
    """Each member's weight ``W = (U^-1 A)^T`` in ``dtype``, a block of outputs at a time: the corrected weights
    a back-map through the weight needs (``spadi_ao.correction``)."""
    rows = max(1, BLOCK_ELEMENTS // (4 * whitened.shape[0]))
    weights = []
    for span in _spans(outs):
        weight = torch.empty(span.stop - span.start, whitened.shape[0], dtype=dtype, device=whitened.device)
        for start in range(span.start, span.stop, rows):
            stop = min(start + rows, span.stop)
            weight[start - span.start : stop - span.start] = whitening.apply_inverse(whitened[:, start:stop]).T
        weights.append(weight)
    return weights


def _whitened_weight(whitening: Whitening, weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``A = U [W_1; W_2; ...]^T`` (in x sum of outs): one column per output neuron, Frobenius error == output
    error.

    Computed in float64 a block of outputs at a time, each member written into its own columns: neither a
    full-size float64 copy nor a stacked copy of the members' weights is made next to the result. The blocks are
    a quarter of the usual (8 MiB each): this scratch sits beside the widest whitening factor, a sequential run's
    peak, and the GEMMs stay as fast.
    """
    in_features = weights[0].shape[1]
    rows = max(1, BLOCK_ELEMENTS // (4 * in_features))
    outs = [weight.shape[0] for weight in weights]
    whitened = torch.empty(in_features, sum(outs), dtype=SOLVE_DTYPE, device=weights[0].device)
    for weight, span in zip(weights, _spans(outs)):
        for start in range(0, weight.shape[0], rows):
            chunk = weight[start : start + rows].to(torch.float64).T
            whitened[:, span.start + start : span.start + start + chunk.shape[1]] = whitening.apply(chunk)
    return whitened


def solve_dictionary(
    whitened: torch.Tensor, k: int, s: int, config: DictionaryConfig, output_weights: Optional[torch.Tensor] = None
) -> KSVDResult:
    """The configured solver on the whitened weight: K-SVD (the paper's), the few-step fast solver or
    orthonormal atoms by alternating Procrustes (COMPOT-style).

    ``output_weights`` (one per column): minimise ``sum_j w_j ||a_j - D c_j||^2`` instead, by solving for the
    columns scaled by ``sqrt(w_j)`` and unscaling the codes. ``whitened`` is scaled in place and restored (to
    rounding), so the weighting costs no copy of it.
    """
    if output_weights is None:
        return _solve(whitened, k, s, config)
    root = output_weights.sqrt().to(device=whitened.device, dtype=whitened.dtype)
    whitened.mul_(root)
    try:
        result = _solve(whitened, k, s, config)
    finally:
        whitened.div_(root)
    result.coefficients.div_(root.unsqueeze(1).to(result.coefficients.dtype))
    return result


def _solve(whitened: torch.Tensor, k: int, s: int, config: DictionaryConfig) -> KSVDResult:
    if config.solver == "fast":
        return fast_dictionary(whitened, k, s, steps=config.fast_steps, seed=config.seed)
    if config.solver == "procrustes":
        return procrustes_dictionary(
            whitened, k, s, iterations=config.iterations, seed=config.seed, refit_steps=config.fast_steps
        )
    return ksvd(
        whitened,
        k,
        s,
        iterations=config.iterations,
        power_iterations=config.power_iterations,
        seed=config.seed,
        atoms_per_step=config.atoms_per_step,
        init=config.init,
    )


def _dictionary_bytes(tensor: DictionaryTensor) -> int:
    return stored_bytes(tensor.dictionary) + stored_bytes(tensor.dictionary_scale)


def compress_group(
    names: Sequence[str],
    weights: Sequence[torch.Tensor],
    grams: Sequence[Optional[torch.Tensor]],
    config: DictionaryConfig,
    calibration_tokens: int = 0,
    shrinkages: Optional[Sequence[Optional[float]]] = None,
    group: Optional[str] = None,
    overwrite_gram: bool = False,
    output_weights: Optional[torch.Tensor] = None,
    crosses: Optional[Sequence[torch.Tensor]] = None,
) -> list[tuple[DictionaryTensor, LayerReport]]:
    """Compress layers that share one dictionary; each keeps its own codes (see ``spadi_ao.grouping``).

    The budget is the group's: ``k`` atoms stored once plus every member's codes, within
    ``(1 - compression_ratio)`` of the members' dense bytes. Every returned tensor references the same
    ``dictionary`` object. A member's report counts its codes and its share of the dictionary (in
    proportion to its outputs), so the shares add up to the group's bytes exactly.

    ``output_weights`` (the members' outputs in order; ``spadi_ao.allocation.output_weights``) weigh each
    output's error in the solve; the reports still give the plain output error.

    ``crosses`` (one per member, ``spadi_ao.correction``): fit the dense model's outputs instead of the weights;
    the members must share one Gram. The reports' errors are then relative to the corrected weights.
    """
    start = time.perf_counter()
    handed_over = overwrite_gram and len(weights) == 1
    whitening, whitened, shrinkage = whiten_group(weights, grams, config, shrinkages, handed_over, crosses)
    method = whitening.method
    outs = [weight.shape[0] for weight in weights]
    in_features, dtype = weights[0].shape[1], weights[0].dtype
    if in_features > sum(outs):  # the factor outweighs the whitened weight: freed, atoms map back through W
        if crosses is not None:  # through the corrected W, formed while the factor is still here
            weights = _input_space(whitening, whitened, outs, dtype)
        whitening = None
        if handed_over:  # the caller's Gram, now the factor (512 MiB at 8192 inputs), goes before the solve
            grams.clear()
            grams = [None]  # one member: its error is the whitened fit's
    budget = dictionary_budget(
        sum(outs),
        in_features,
        config.compression_ratio,
        config.rho,
        weights[0].element_size(),
        atom_limit(config.solver, in_features),
    )
    result = solve_dictionary(whitened, budget.k, budget.s, config, output_weights)
    spans = _spans(outs)
    if whitening is not None:
        # The factor alone maps the atoms back: the members are scored first and the whitened weight (128 MiB
        # for the 1B shape's gate/up) is gone before the back-map's scratch exists.
        errors = _whitened_fit_errors(whitened, grams, spans, result)
        del whitened
        atoms = _back_map(whitening, None, weights, result.dictionary, dtype)
        del whitening
    else:  # through the weight, which projects the dictionary on A's span: scored as stored
        atoms = _back_map(None, whitened, weights, result.dictionary, dtype)
        errors = _whitened_fit_errors(whitened, grams, spans, result)
        del whitened
    errors = [
        _own_gram_error(weight, gram, atoms, result, span, config, shrinkage) if error is None else error
        for weight, gram, span, error in zip(weights, grams, spans, errors)
    ]
    tensors = []
    for span in spans:
        values, bitmask = pack_codes(result.indices[span], result.coefficients[span], budget.k)
        tensors.append(DictionaryTensor(atoms, values.to(dtype), bitmask, dtype))
    shared = quantize_dictionary(tensors[0], config.dictionary_quantization, config.values_dtype)
    tensors = [shared] + [quantize_dictionary(tensor, None, config.values_dtype) for tensor in tensors[1:]]
    tensors = [
        DictionaryTensor(shared.dictionary, t.values, t.bitmask, dtype, shared.dictionary_scale, t.value_scale)
        for t in tensors
    ]
    shares = split_bytes(_dictionary_bytes(shared), outs)
    seconds = (time.perf_counter() - start) / len(names)
    results = []
    for index, (name, weight, error) in enumerate(zip(names, weights, errors)):
        tensor = tensors[index]
        stored = tensor.stored_bytes() - _dictionary_bytes(tensor) + shares[index]
        dense = weight.shape[0] * in_features * weight.element_size()
        report = LayerReport(
            name=name,
            method="cospadi",
            out_features=weight.shape[0],
            in_features=in_features,
            dense_bytes=dense,
            stored_bytes=stored,
            compression_ratio=1.0 - stored / dense,
            whitened_error=error,
            seconds=seconds,
            k=budget.k,
            s=budget.s,
            paper_ratio=budget.paper_ratio,
            whitening=method,
            gram_shrinkage=shrinkage,
            calibration_tokens=calibration_tokens,
            group=group,
        )
        results.append((tensor, report))
    return results


def _spans(outs: Sequence[int]) -> list[slice]:
    """Each member's columns of the stacked whitened weight (slices: views, never copies)."""
    ends = list(accumulate(outs))
    return [slice(end - out, end) for out, end in zip(outs, ends)]


def _back_map(
    whitening: Optional[Whitening],
    whitened: Optional[torch.Tensor],
    weights: Sequence[torch.Tensor],
    dictionary: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The atoms in input space as ``(k, in)`` rows in ``dtype``, a block at a time.

    With the factor, ``D~ = U^-1 D`` by a triangular solve (``whitened`` is not read and may be None). Without
    it (a tall whitened weight, whose factor was freed before the solve), through the weight:
    ``U^-1 P D = W^T X`` with ``A X = P D`` (:func:`span_coordinates`); ``dictionary`` then becomes ``P D`` in
    place, the atoms as stored.
    """
    in_features, count = dictionary.shape
    if whitening is None:
        coordinates = span_coordinates(whitened, dictionary)
        step = max(1, BLOCK_ELEMENTS // in_features)
        for start in range(0, count, step):
            dictionary[:, start : start + step] = whitened @ coordinates[:, start : start + step].to(whitened.dtype)
        return atoms_in_input_space(weights, coordinates, dtype)
    atoms = torch.empty(count, in_features, dtype=dtype, device=dictionary.device)
    step = max(1, BLOCK_ELEMENTS // in_features)
    for start in range(0, count, step):
        atoms[start : start + step] = whitening.apply_inverse(dictionary[:, start : start + step]).T
    return atoms


def span_coordinates(whitened: torch.Tensor, dictionary: torch.Tensor) -> torch.Tensor:
    """``X`` (outs x k, float64) with ``A X`` the projection of the whitened atoms ``D`` on ``A``'s column span.

    With ``A = U W^T``, ``U^-1 A X = W^T X``: atoms map back to input space through the weight, without the
    whitening factor. Every solver builds its atoms in that span while ``k`` is within ``A``'s rank (SVD start,
    Procrustes update, least-squares dictionary); a component outside it is dropped, which cannot raise the fit
    error: ``A - P D C = P (A - D C)``. ``X`` solves the normal equations ``(A^T A + r I) X = A^T D`` in
    float64, both sides gathered a block of ``A``'s rows at a time, so the scratch is ``outs x (outs + k)``: the
    small side of a tall ``A``, where this is used. The ridge ``r`` (``SPAN_RCOND^2 ||A^T A||``) leaves out the
    directions that are float32 rounding of ``A``, not span.
    """
    in_features, outs = whitened.shape
    gram = torch.zeros(outs, outs, dtype=torch.float64, device=whitened.device)
    products = torch.zeros(outs, dictionary.shape[1], dtype=torch.float64, device=whitened.device)
    rows = max(1, BLOCK_ELEMENTS // max(outs, dictionary.shape[1]))
    for start in range(0, in_features, rows):
        block = whitened[start : start + rows].to(torch.float64)
        gram.addmm_(block.T, block)
        products.addmm_(block.T, dictionary[start : start + rows].to(torch.float64))
    ridge = (SPAN_RCOND**2 * gram.norm()).clamp_min(torch.finfo(torch.float64).tiny)
    gram.diagonal().add_(ridge)
    factor = torch.linalg.cholesky(gram)
    del gram
    return torch.cholesky_solve(products, factor)


def atoms_in_input_space(
    weights: Sequence[torch.Tensor], coordinates: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``D~^T = [W_1; W_2; ...]^T X`` as ``(k, in)`` rows in ``dtype``, a block of input columns at a time in
    float64, so the scratch is one block's, not a float64 copy of the atoms or of the members' weights."""
    in_features = weights[0].shape[1]
    outs, count = coordinates.shape
    atoms = torch.empty(count, in_features, dtype=dtype, device=coordinates.device)
    columns = max(1, BLOCK_ELEMENTS // max(outs, count))
    spans = _spans([weight.shape[0] for weight in weights])
    for start in range(0, in_features, columns):
        block = torch.zeros(count, min(columns, in_features - start), dtype=torch.float64, device=atoms.device)
        for weight, span in zip(weights, spans):
            block.addmm_(coordinates[span].T, weight[:, start : start + columns].to(torch.float64))
        atoms[:, start : start + columns] = block
    return atoms


def _fit_error(
    target: torch.Tensor, dictionary: torch.Tensor, indices: torch.Tensor, coefficients: torch.Tensor
) -> float:
    """``||A - D C|| / ||A||`` for codes given as (indices, coefficients)."""
    return sparse_squared_error(target, dictionary, indices, coefficients) ** 0.5 / max(float(target.norm()), 1e-30)


def _whitened_fit_errors(
    whitened: torch.Tensor, grams: Sequence[Optional[torch.Tensor]], spans: Sequence[slice], result: KSVDResult
) -> list[Optional[float]]:
    """Each member's relative output error where the group's whitening is its own (one Gram, or members reading
    the same input): the whitened fit's. None for a member with a Gram of its own (:func:`_own_gram_error`)."""
    return [
        _fit_error(whitened[:, span], result.dictionary, result.indices[span], result.coefficients[span])
        if gram is None or all(other is not None and (other is gram or torch.equal(other, gram)) for other in grams)
        else None
        for gram, span in zip(grams, spans)
    ]


def _own_gram_error(
    weight: torch.Tensor,
    gram: torch.Tensor,
    atoms: torch.Tensor,
    result: KSVDResult,
    span: slice,
    config: DictionaryConfig,
    shrinkage: float,
) -> float:
    """A member's relative output error under its *own* Gram (the group's whitening only averages it), from the
    input-space ``atoms``."""
    own = whitening_for(gram, weight.shape[1], config.damping, shrinkage, weight.device)
    dense_codes = codes_to_dense(result.indices[span], result.coefficients[span], atoms.shape[0]).to(torch.float64)
    reconstructed = atoms.to(torch.float64).T @ dense_codes  # W_hat^T
    return _relative_error(own.apply(weight.to(torch.float64).T), own.apply(reconstructed))


def compress_weight(
    name: str,
    weight: torch.Tensor,
    gram: Optional[torch.Tensor],
    config: DictionaryConfig | LowRankConfig,
    calibration_tokens: int = 0,
    shrinkage: Optional[float] = None,
    overwrite_gram: bool = False,
    output_weights: Optional[torch.Tensor] = None,
    cross: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, LayerReport]:
    """Compress one dense ``weight`` (out x in) into a Dictionary/LowRank tensor and its report.

    ``overwrite_gram=True``: the caller is done with ``gram`` (e.g. ``GramCollector.take``) and keeps no
    reference to it: it is factored in place, and for a dictionary of a weight with more inputs than outputs
    (a ``down_proj``) freed before the solve, so no in x in float64 matrix (512 MiB for an 8192-wide input)
    sits beside the solver. ``output_weights``: as in :func:`compress_group`
    (dictionary configs; the low-rank baseline weighs every output alike). ``cross``: fit the dense model's
    outputs instead of ``weight`` (see :func:`compress_group`).
    """
    crosses = None if cross is None else [cross]
    if isinstance(config, DictionaryConfig):
        grams = [gram]
        del gram  # handed over with ``overwrite_gram``: ``compress_group`` clears ``grams``, its last reference
        return compress_group(
            [name],
            [weight],
            grams,
            config,
            calibration_tokens,
            [shrinkage],
            overwrite_gram=overwrite_gram,
            output_weights=output_weights,
            crosses=crosses,
        )[0]
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"config must be a DictionaryConfig or LowRankConfig, got {type(config).__name__}")
    start = time.perf_counter()
    out_features, in_features = weight.shape
    element_size = weight.element_size()
    whitening, whitened, shrinkage = whiten_group([weight], [gram], config, [shrinkage], overwrite_gram, crosses)
    budget = low_rank_budget(out_features, in_features, config.compression_ratio, element_size)
    left, right = whitened_low_rank(whitened, budget.rank)
    down = _back_map(whitening, whitened, [weight], left, weight.dtype)  # (rank, in)
    tensor = LowRankTensor(down, right.T.to(weight.dtype).contiguous(), weight.dtype)
    dense = out_features * in_features * element_size
    report = LayerReport(
        name=name,
        method="svd-llm",
        out_features=out_features,
        in_features=in_features,
        dense_bytes=dense,
        stored_bytes=tensor.stored_bytes(),
        compression_ratio=1.0 - tensor.stored_bytes() / dense,
        whitened_error=_relative_error(whitened, left @ right),
        seconds=time.perf_counter() - start,
        rank=budget.rank,
        whitening=whitening.method,
        gram_shrinkage=shrinkage,
        calibration_tokens=calibration_tokens,
    )
    return tensor, report


def resolve_shrinkage(setting: float | str, collector: Optional["GramCollector"], name: str) -> float:
    """A float setting is used as is; ``"auto"`` is estimated from ``name``'s calibration sequences alone."""
    if setting != "auto":
        return float(setting)
    return collector.shrinkage(name) if collector is not None else 0.0


def compress_linear(
    name: str,
    weight: torch.Tensor,
    config: DictionaryConfig | LowRankConfig,
    collector: Optional["GramCollector"] = None,
    take: bool = False,
    output_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, LayerReport]:
    """One Linear on its own, with its Gram from ``collector`` (None: weight space), at ``config`` as given
    (the caller resolves ``layer_overrides`` and allocation): the step ``sparsify_dictionary_``, its
    block-by-block driver and torchao's ``quantize_`` handlers share.

    ``take=True``: the caller needs ``name``'s Gram no more (``GramCollector.take``); it is factored in place.
    ``output_weights``: see :func:`compress_group`.
    """
    shrinkage = resolve_shrinkage(config.gram_shrinkage, collector, name)  # before take() may free the sum
    if collector is None:
        return compress_weight(name, weight, None, config, 0, shrinkage, output_weights=output_weights)
    tokens = collector.tokens(name)
    return compress_weight(
        name,
        weight,
        collector.take(name) if take else collector.gram(name),
        config,
        tokens,
        shrinkage,
        overwrite_gram=take,
        output_weights=output_weights,
    )
