"""Global budget allocation: per-layer compression ratios that minimise a whole-model error proxy.

Every unit (one layer, or a group of layers sharing a dictionary) has a few candidate sizes, each with
its honest stored bytes and an error. Picking one candidate per unit so that the total error is minimal
and the total bytes stay within the budget is a multiple-choice knapsack, solved exactly by dynamic
programming over bytes (:func:`solve_knapsack`).

The error of a candidate is the one-shot CoSpaDi solution's, read off one spectral decomposition of the
whitened weight for every candidate at once (:func:`threshold_errors`): the leading ``k`` singular vectors are
the dictionary and each column keeps its ``s`` largest coefficients. It is exactly what the ``ksvd``
solver with ``iterations=0`` returns and an upper bound for every solver that starts from it. Columns
are weighted by ``column_weights``: with the loss' mean squared gradient per output
(:func:`output_sensitivity`), ``sum_j f_j ||U (w_j - w^_j)||^2`` is the second-order (Fisher) estimate
of the loss increase the layer's error causes, which puts every layer on the same scale, the loss.
The same sensitivities weigh the solve itself (:func:`output_weights`, ``DictionaryConfig.output_weighting``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from spadi_ao.budget import atom_limit, dictionary_budget, low_rank_budget
from spadi_ao.configs import CompressionConfig, DictionaryConfig
from spadi_ao.solvers.codes import column_blocks
from spadi_ao.solvers.ksvd import gram_spectrum

__all__ = [
    "Candidate",
    "candidate_sizes",
    "solve_knapsack",
    "atom_energy_blocks",
    "threshold_errors",
    "output_sensitivity",
    "output_weights",
    "WEIGHT_FLOOR",
]

WEIGHT_FLOOR = 1e-3
"""The least weight an output gets in the solve, relative to its unit's mean: an output the calibration loss
never moved still counts a little, so its fit does not collapse on inputs the calibration did not cover."""


@dataclass(frozen=True)
class Candidate:
    """One size a unit may take: its ratio, honest stored bytes, and ``(k, s)`` (``(rank, rank)`` for low rank)."""

    ratio: float
    stored_bytes: int
    k: int
    s: int


def candidate_sizes(
    config: CompressionConfig, out_features: int, in_features: int, element_size: int, ratios: Sequence[float]
) -> list[Candidate]:
    """The sizes the budget gives each of ``ratios``; ratios that leave no ``k, s`` (or rank) >= 1 are dropped."""
    candidates = []
    for ratio in ratios:
        try:
            if isinstance(config, DictionaryConfig):
                budget = dictionary_budget(
                    out_features, in_features, ratio, config.rho, element_size, atom_limit(config.solver, in_features)
                )
                candidates.append(Candidate(ratio, budget.stored_bytes, budget.k, budget.s))
            else:
                low_rank = low_rank_budget(out_features, in_features, ratio, element_size)
                candidates.append(Candidate(ratio, low_rank.stored_bytes, low_rank.rank, low_rank.rank))
        except ValueError:
            continue
    return candidates


def solve_knapsack(
    costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int, max_bins: int = 1 << 17
) -> list[int]:
    """One candidate index per unit minimising ``sum(errors)`` with ``sum(costs) <= budget``.

    Exact dynamic programming over bytes when ``budget <= max_bins``. Larger budgets are counted in
    quanta of ``q = ceil(budget / max_bins)`` bytes, every cost rounded *up* and the budget *down*, so a
    pick that fits in quanta always fits in bytes (``sum(cost) <= q * sum(ceil(cost / q)) <= budget``);
    what can be lost is at most ``q`` bytes per unit of slack. Raises if not even the cheapest
    candidates fit.
    """
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs and errors must give the same, non-zero number of candidates for every unit")
    if any(cost < 0 for unit in costs for cost in unit):
        raise ValueError("candidate costs must be >= 0 bytes")
    if max_bins < 1:
        raise ValueError(f"max_bins must be >= 1, got {max_bins}")
    cheapest = sum(min(unit) for unit in costs)
    if cheapest > budget:
        raise ValueError(
            f"the budget of {budget} bytes is below the cheapest choice ({cheapest} bytes); raise the budget"
        )
    quantum = max(1, math.ceil(budget / max_bins))
    capacity = budget // quantum
    weights = [[math.ceil(cost / quantum) for cost in unit] for unit in costs]
    best = torch.zeros(capacity + 1, dtype=torch.float64)  # best[b]: least error of the units so far within b quanta
    picks = torch.empty(len(costs), capacity + 1, dtype=torch.int32)
    for unit, (unit_weights, unit_errors) in enumerate(zip(weights, errors)):
        new = torch.full_like(best, math.inf)
        pick = torch.full((capacity + 1,), -1, dtype=torch.int32)
        for candidate, (weight, error) in enumerate(zip(unit_weights, unit_errors)):
            if weight > capacity:
                continue
            trial = best[: capacity + 1 - weight] + float(error)
            better = trial < new[weight:]
            new[weight:] = torch.where(better, trial, new[weight:])
            pick[weight:][better] = candidate
        best, picks[unit] = new, pick
    if not math.isfinite(float(best[capacity])):
        raise ValueError(
            f"no choice fits {budget} bytes once costs are rounded up to {quantum}-byte quanta; raise max_bins or "
            "the budget"
        )
    chosen, remaining = [], capacity
    for unit in reversed(range(len(costs))):
        candidate = int(picks[unit, remaining])
        chosen.append(candidate)
        remaining -= weights[unit][candidate]
    return chosen[::-1]


def atom_energy_blocks(whitened: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """Blocks of columns of ``whitened`` (n x m) with their (c, r) float64 energies: the squared coefficient
    of each column on each of its ``r = min(n, m)`` singular directions, strongest direction first.

    From the smaller float64 Gram's eigendecomposition (``gram_spectrum``, the solvers' SVD start) rather
    than a full SVD: for a wide weight (``n <= m``) the coefficients are ``A^T U``; for a tall one,
    ``sigma_i v_ji``, so their squares are ``lambda_i v_ji^2``. Each row sums to its column's squared norm:
    the directions span every column. A block at a time, so a wide group (the 1B shape's 2048 x 16384
    gate/up) never holds all ``m x r`` energies at once.
    """
    n, m = whitened.shape
    eigenvalues, eigenvectors = gram_spectrum(whitened)
    for block in column_blocks(m, min(n, m)):
        if n > m:
            yield block, eigenvectors[block].pow(2) * eigenvalues.clamp_min(0.0)
        else:
            yield block, torch.mm(whitened[:, block].to(torch.float64).T, eigenvectors).pow_(2)


def threshold_errors(
    whitened: torch.Tensor, sizes: Sequence[tuple[int, int]], column_weights: Optional[torch.Tensor] = None
) -> list[float]:
    """Weighted squared error of the SVD dictionary + top-``s`` codes of ``whitened`` (n x m) per ``(k, s)``.

    ``column_weights`` (m,) weight each column's squared error (default 1). One eigendecomposition serves every
    size (:func:`atom_energy_blocks`), and one sort of each column's energies: a size keeps, in sorted order, the
    first ``s`` entries that belong to one of the leading ``k`` directions, and its error is the energy left over.
    """
    m = whitened.shape[1]
    weights = (
        torch.ones(m, dtype=torch.float64, device=whitened.device)
        if column_weights is None
        else column_weights.to(torch.float64)
    )
    errors = torch.zeros(len(sizes), dtype=torch.float64)
    for block, energies in atom_energy_blocks(whitened):
        values, directions = energies.sort(dim=1, descending=True)
        del energies
        r = values.shape[1]
        positions = torch.arange(r, device=values.device)
        for index, (k, s) in enumerate(sizes):
            if k >= r:  # every direction allowed: the first s sorted entries are kept
                kept = positions < s
            else:
                allowed = directions < k
                kept = allowed & (allowed.cumsum(dim=1) <= s)
            errors[index] += float(values.masked_fill(kept, 0.0).sum(dim=1) @ weights[block])
    return errors.tolist()


def output_sensitivity(
    model: nn.Module, modules: dict[str, nn.Linear], batches: Iterable[Any], progress: bool = False
) -> dict[str, torch.Tensor]:
    """Mean squared loss gradient per output feature of each Linear (the diagonal output Fisher).

    Runs the causal-LM loss (labels = inputs) with backward passes in eval mode; parameters get no
    gradients. ``batches`` are what ``sparsify_dictionary_`` takes as calibration; padded positions
    (``attention_mask`` 0) are neither predicted nor counted.
    """
    from tqdm.auto import tqdm

    from spadi_ao.inputs import calibration_batches, eval_mode

    batches = calibration_batches(batches, model)
    totals: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current: dict[str, Optional[torch.Tensor]] = {"keep": None}

    def track(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            keep = current["keep"]

            def accumulate(grad: torch.Tensor) -> None:
                grad = grad.detach()
                flat = (grad[keep] if keep is not None else grad.reshape(-1, grad.shape[-1])).to(torch.float64)
                totals[name] = totals.get(name, 0) + flat.pow(2).sum(0)
                counts[name] = counts.get(name, 0) + flat.shape[0]

            output.register_hook(accumulate)

        return hook

    handles = [module.register_forward_hook(track(name)) for name, module in modules.items()]
    device = next(
        (p.device for p in model.parameters() if not p.is_meta), torch.device("cpu")
    )  # offloaded ones are on meta
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with eval_mode(model), torch.enable_grad():  # also when the caller runs under torch.no_grad()
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            embeddings = model.get_input_embeddings()
            for batch in tqdm(batches, desc="loss sensitivity", disable=not progress, leave=False):
                kwargs = {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
                ids, mask = kwargs.pop("input_ids"), kwargs.get("attention_mask")
                kwargs.pop("labels", None)  # the loss is the causal LM's own: labels = inputs
                current["keep"] = mask.bool() if mask is not None and not bool(mask.all()) else None
                labels = ids if current["keep"] is None else ids.masked_fill(~current["keep"], -100)
                inputs = embeddings(ids).detach().requires_grad_(True)  # a graph without parameter gradients
                kwargs["use_cache"] = False
                loss = model(inputs_embeds=inputs, labels=labels, **kwargs).loss
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires[name])
    return {name: totals[name] / counts[name] for name in totals}


def output_weights(sensitivities: Sequence[torch.Tensor]) -> torch.Tensor:
    """One unit's per-output weights in the loss-weighted solve, its members' outputs in order: each output's
    loss sensitivity over the unit's mean, floored at :data:`WEIGHT_FLOOR`.

    Only the weights' ratios within the unit change its solution, so the mean sets the floor's scale and
    nothing else; the knapsack compares units on the raw sensitivities (:func:`threshold_errors`).
    """
    values = torch.cat([value.to(torch.float64).flatten() for value in sensitivities])
    if values.numel() == 0 or not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError("output sensitivities must be finite and >= 0")
    mean = values.mean()
    if mean <= 0:  # the loss moved no output: all weigh alike
        return torch.ones_like(values)
    return (values / mean).clamp_min(WEIGHT_FLOOR)
