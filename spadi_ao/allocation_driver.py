"""The whole-model knapsack run on a model: each unit's candidate table, the byte budget, the chosen ratios.

``spadi_ao.allocation`` holds the math (candidate sizes, threshold errors, the exact knapsack, the loss
sensitivity) on plain tensors; this module feeds it one solve unit at a time from the unit's weights, Grams
and loss sensitivity, for the one-shot transform (:func:`allocate_ratios`) and for the block-by-block first
pass, which tabulates a block's units as their Grams appear and solves the knapsack once at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from spadi_ao.allocation import (
    Candidate,
    candidate_sizes,
    output_sensitivity,
    output_weights,
    solve_knapsack,
    threshold_errors,
)
from spadi_ao.calibration import GramCollector
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.layer import resolve_shrinkage, whiten_group

__all__ = [
    "tabulate_unit",
    "byte_budget",
    "allocate_ratios",
    "has_language_model_loss",
    "resolve_sensitivity",
    "solve_weights",
]

logger = logging.getLogger(__name__)


def tabulate_unit(
    config: DictionaryConfig | LowRankConfig,
    unit: list[str],
    weights: list[torch.Tensor],
    grams: list[Optional[torch.Tensor]],
    shrinkages: list[float],
    sensitivity: dict[str, torch.Tensor],
    overwrite_gram: bool = False,
) -> tuple[list[Candidate], list[float]]:
    """One unit's knapsack menu and the loss-weighted error of each candidate (see ``spadi_ao.allocation``).

    ``overwrite_gram``: the caller hands its one Gram over; it is factored in place and ``grams`` emptied, so the
    factor is freed as soon as the weight is whitened.
    """
    unit_config = config.for_layer(unit[0])
    pinned = "compression_ratio" in config.overrides_for(unit[0])
    ratios = (unit_config.compression_ratio,) if pinned else config.allocation_candidates
    menu = candidate_sizes(
        unit_config, sum(w.shape[0] for w in weights), weights[0].shape[1], weights[0].element_size(), ratios
    )
    if not menu:
        raise ValueError(f"{unit[0]}: no ratio in allocation_candidates leaves k, s >= 1; add smaller candidates")
    whitened = whiten_group(weights, grams, unit_config, shrinkages, overwrite_gram)[1]
    if overwrite_gram:  # handed over: its memory, now the whitening factor (512 MiB at 8192 inputs), goes here
        grams.clear()
    column_weights = torch.cat([sensitivity[name].to(torch.float64) for name in unit]).to(whitened.device)
    return menu, threshold_errors(whitened, [(c.k, c.s) for c in menu], column_weights)


def solve_weights(
    config: DictionaryConfig | LowRankConfig, unit: list[str], sensitivity: Optional[dict[str, torch.Tensor]]
) -> Optional[torch.Tensor]:
    """The unit's per-output weights for the loss-weighted solve, or None where it solves unweighted: no
    sensitivity, ``output_weighting="none"`` or the low-rank baseline."""
    unit_config = config.for_layer(unit[0])
    if sensitivity is None or not isinstance(unit_config, DictionaryConfig) or unit_config.output_weighting != "loss":
        return None
    return output_weights([sensitivity[name] for name in unit])


def byte_budget(targets: dict[str, nn.Linear], config: DictionaryConfig | LowRankConfig) -> int:
    """The whole-model budget: ``1 - compression_ratio`` of the selected Linears' dense bytes."""
    dense = sum(module.weight.numel() * module.weight.element_size() for module in targets.values())
    return int((1.0 - config.compression_ratio) * dense)


def allocate_ratios(
    units: dict[str, list[str]],
    targets: dict[str, nn.Linear],
    config: DictionaryConfig | LowRankConfig,
    collector: Optional[GramCollector],
    sensitivity: dict[str, torch.Tensor],
    progress: bool,
) -> dict[str, float]:
    """Each unit's ratio from the exact knapsack over its candidates (see ``spadi_ao.allocation``)."""
    costs, errors, menus = [], [], []
    for unit in tqdm(units.values(), desc="allocating", disable=not progress):
        unit_config = config.for_layer(unit[0])
        weights = [targets[name].weight.detach() for name in unit]
        grams = collector.grams(unit) if collector is not None else [None] * len(unit)
        shrinkages = [resolve_shrinkage(unit_config.gram_shrinkage, collector, name) for name in unit]
        menu, unit_errors = tabulate_unit(config, unit, weights, grams, shrinkages, sensitivity)
        errors.append(unit_errors)
        costs.append([c.stored_bytes for c in menu])
        menus.append(menu)
    picks = solve_knapsack(costs, errors, byte_budget(targets, config))
    return {label: menu[pick].ratio for label, menu, pick in zip(units, menus, picks)}


def resolve_sensitivity(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    calibration: Any,
    given: Optional[dict[str, torch.Tensor]],
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Each target's loss sensitivity per output: ``given`` (checked to cover every target), else from the causal-LM
    loss on ``calibration``, else every output alike (with a warning saying so)."""
    if given is not None:
        missing = sorted(set(targets) - set(given))
        if missing:
            raise ValueError(f"sensitivity lacks {missing[:3]}; give one tensor (out_features,) per compressed Linear")
        return given
    if not has_language_model_loss(model, calibration):
        # No causal-LM loss to differentiate (a prepared collector, no calibration, or not a language model fed
        # token ids): every output counts alike, so the knapsack still spends the whole-model budget where the
        # whitened error is lowest, without the loss' weighting.
        logger.warning(
            "allocation='knapsack' without token-id batches of a causal LM: weighing every output alike (pass them, or "
            "sensitivity=spadi_ao.allocation.output_sensitivity(model, modules, batches), for the loss-weighted choice)"
        )
        return {name: torch.ones(module.weight.shape[0]) for name, module in targets.items()}
    return output_sensitivity(model, targets, calibration, progress=progress)


def has_language_model_loss(model: nn.Module, calibration: Any) -> bool:
    """Whether ``output_sensitivity`` applies: a model with input embeddings, calibrated on token-id tensors."""
    if (
        calibration is None
        or isinstance(calibration, GramCollector)
        or not callable(getattr(model, "get_input_embeddings", None))
    ):
        return False
    return all(not _ids(batch).is_floating_point() for batch in calibration)


def _ids(batch: Any) -> torch.Tensor:
    """A calibration batch's token ids (a tensor, or a mapping of model kwargs such as a tokenizer's output)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    return ids if torch.is_tensor(ids) else torch.empty(0)
