"""``sparsify_dictionary_``: the one-line, in-place transform (and its prepare step).

The only place that walks a model: select Linears, validate everything (``spadi_ao.validation``), gather
Grams, choose per-unit ratios when asked (``spadi_ao.allocation_driver``), compress each layer into *new*
tensors, and swap them in only once every layer has succeeded. ``sequential=True`` hands the walk to
``spadi_ao.sequential``; either way the result is a ``spadi_ao.report.CompressionReport``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from spadi_ao.allocation import output_sensitivity, solve_knapsack
from spadi_ao.allocation_driver import (
    allocate_ratios,
    byte_budget,
    has_language_model_loss,
    resolve_sensitivity,
    solve_weights,
    tabulate_unit,
)
from spadi_ao.calibration import CALIBRATION_ATTR, GramCollector, attach_collector, run_calibration
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.grouping import group_layers, relink_shared
from spadi_ao.inputs import calibration_batches, eval_mode
from spadi_ao.layer import LayerReport, compress_group, compress_linear, compress_weight, resolve_shrinkage
from spadi_ao.report import CompressionReport
from spadi_ao.sequential import PROPAGATIONS, GlobalAllocation, run_sequential
from spadi_ao.validation import check_overrides, check_targets, nothing_selected_message, refuse_blockwise_only

__all__ = ["sparsify_dictionary_", "prepare_calibration", "select_linears"]

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]


def _skipped_by_default(model: nn.Module) -> set[int]:
    """Output head and anything tied to an embedding: not a projection, and shared with the input."""
    skipped: set[int] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is not None:
        skipped.add(id(head))
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights:
            skipped.add(id(module))
    return skipped


def select_linears(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> dict[str, nn.Linear]:
    """The Linears to compress: ``filter_fn(module, fqn)`` when given, else all but head/embeddings."""
    skipped = _skipped_by_default(model) if filter_fn is None else set()
    selected = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in skipped:
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        selected[name] = module
    return selected


def prepare_calibration(model: nn.Module, filter_fn: Optional[FilterFn] = None, exact: bool = False) -> GramCollector:
    """Prepare step: hook the selected Linears; run forward passes, then call ``sparsify_dictionary_``."""
    return attach_collector(model, select_linears(model, filter_fn), exact=exact)


def _units(targets: dict[str, nn.Linear], config: DictionaryConfig | LowRankConfig) -> dict[str, list[str]]:
    """The solve units, name -> layers: groups sharing a dictionary (``config.grouping``), else one per layer."""
    units = group_layers(list(targets), config.grouping if isinstance(config, DictionaryConfig) else None)
    for unit in units.values():
        weights = [targets[name].weight for name in unit]
        if len({w.shape[1] for w in weights}) > 1 or len({w.dtype for w in weights}) > 1:
            raise ValueError(
                f"grouping puts {unit} in one group, but they differ in in_features or dtype; they cannot share a "
                "dictionary"
            )
        if any(config.for_layer(name) != config.for_layer(unit[0]) for name in unit[1:]):
            raise ValueError(f"grouping puts {unit} in one group, but layer_overrides give them different settings")
    return units


def _finish(model: nn.Module, config: DictionaryConfig | LowRankConfig, report: CompressionReport) -> None:
    """What a compressed model shows and saves: each Linear describes its weight (as torchao's do), and a
    transformers model gets its quantizer, so ``model.save_pretrained`` works without another call."""
    from spadi_ao.integrations.transformers import attach_quantizer, compression_record
    from spadi_ao.tensor_ops import describe_linears

    describe_linears(model)
    if _is_pretrained(model):
        attach_quantizer(model, compression=compression_record(config, report))


def _is_pretrained(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _collect(
    model: nn.Module, targets: dict[str, nn.Linear], calibration: Any, with_sensitivity: bool, progress: bool
) -> tuple[Optional[GramCollector], Optional[dict[str, torch.Tensor]]]:
    """The Grams, and the loss sensitivity when ``with_sensitivity`` asks for it and the calibration has a loss.

    Both come from one pass over the calibration: the loss' forward passes feed the Grams (their activations
    are the inference forward's, bit for bit), so the knapsack costs a backward per batch and no second forward.
    """
    if isinstance(calibration, GramCollector):
        return calibration, None
    if calibration is None:
        return getattr(model, CALIBRATION_ATTR, None), None
    sensitivity = None
    collector = GramCollector(targets, model=model)
    try:
        if with_sensitivity and has_language_model_loss(model, calibration):
            sensitivity = output_sensitivity(model, targets, calibration, progress=progress)
        else:
            run_calibration(model, calibration, progress=progress)
    finally:
        collector.remove()
    return collector, sensitivity


def sparsify_dictionary_(
    model: nn.Module,
    config: DictionaryConfig | LowRankConfig,
    filter_fn: Optional[FilterFn] = None,
    calibration: Optional[Iterable[Any] | GramCollector] = None,
    *,
    sequential: bool = False,
    propagate: str = "compressed",
    checkpoint_dir: Optional[str | os.PathLike] = None,
    device: Optional[str | torch.device] = None,
    sensitivity: Optional[dict[str, torch.Tensor]] = None,
    progress: bool = True,
) -> CompressionReport:
    """Compress the model's Linears in place; each weight becomes a Dictionary/LowRank tensor.

    ``calibration``: token ids ((seq,) or (batch, seq) tensors), a tokenizer's output (any mapping of model
    kwargs with ``input_ids``; its ``attention_mask`` zeros are padding, left out of every statistic), a list
    of these, a prepared :class:`GramCollector`, or None to use the one left by :func:`prepare_calibration`
    (if none was prepared, layers are fitted in weight space). Calibration runs in eval mode. Validation,
    of the calibration too (see ``spadi_ao.inputs``), runs before any weight changes, and the new weights are
    swapped in only after every layer succeeded. A ``transformers`` model gets its quantizer attached at the
    end (``spadi_ao.attach_quantizer``), so ``model.save_pretrained(path)`` works at once.

    ``sequential=True`` walks the decoder one block at a time (see ``spadi_ao.sequential``): only one
    block's Grams exist at once, each block's dense weights are released as it finishes (a failure
    leaves finished blocks compressed and restores the block in flight), ``propagate`` chooses
    what later blocks are calibrated on (``"compressed"``, the default: the activations the compressed blocks
    before produce, what later blocks will really see; ``"dense"``: the dense model's, the whole-model
    transform's result; ``"blended"``: both, their Grams pooled; ``"corrected"``: the compressed ones, and each
    Linear fitted to the dense model's outputs instead of its own dense weight, see ``spadi_ao.correction``;
    ``docs/scaling.md`` measures them), and ``checkpoint_dir`` makes the run
    resumable. Called inside an initialised
    ``torch.distributed`` process group, the per-layer solves are split across ranks. ``device`` (e.g.
    ``"cuda"``) is where each block is moved to be calibrated and solved, one at a time, while the model
    stays where it is. Models dispatched by accelerate (``device_map``, ``cpu_offload``, ``disk_offload``)
    are compressed where their hooks run them, without loading more than a block (see ``spadi_ao.offload``);
    they need ``sequential=True``.

    ``config.allocation="knapsack"`` chooses per-layer ratios that meet the whole-model byte budget; it weighs
    errors by each output's loss sensitivity, computed from the calibration batches (a backward pass each, after the
    forward that also gathers the Grams) unless ``sensitivity`` (fqn -> (out_features,), see
    ``spadi_ao.allocation``) is given; with a prepared collector or no calibration there is no loss to
    differentiate, and every output weighs alike (a one-line warning says so). ``config.grouping`` makes groups of
    layers share one dictionary. Both work block by block too: a first pass gathers every unit's candidate errors
    (dense propagation, one block's Grams at a time; the backward recomputes one block at a time), the knapsack is
    solved once, then the blocks are compressed; with ``propagate="dense"`` the result is the one-shot transform's.
    Groups must lie inside one block there (``grouping="inputs"``; ``"paper"`` pairs blocks and needs
    ``sequential=False``).

    torchao's ``quantize_(model, config)`` runs the same per-layer step (``spadi_ao.layer.compress_linear``)
    on each selected Linear, without the whole-model features: each layer at ``compression_ratio``, its own
    dictionary (see ``spadi_ao.transform``).
    """
    import time

    if not isinstance(config, (DictionaryConfig, LowRankConfig)):
        raise TypeError(f"config must be a DictionaryConfig or LowRankConfig, got {type(config).__name__}")
    if propagate not in PROPAGATIONS:
        raise ValueError(f"propagate must be one of {PROPAGATIONS}, got {propagate!r}")
    start = time.perf_counter()
    targets = select_linears(model, filter_fn)
    if not targets:
        raise ValueError(nothing_selected_message(model))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    blockwise = sequential or checkpoint_dir is not None or distributed
    if not blockwise:
        refuse_blockwise_only(targets, device)
    check_targets(targets, config)
    check_overrides(targets, config)
    if calibration is not None and not isinstance(calibration, GramCollector):
        calibration = calibration_batches(calibration, model)
    units = _units(targets, config)
    if blockwise:
        report = _sparsify_sequential(
            model, config, targets, units, calibration, sensitivity, propagate, checkpoint_dir, device, progress, start
        )
        _finish(model, config, report)
        return report
    collector, measured = _collect(
        model, targets, calibration, config.allocation == "knapsack" and sensitivity is None, progress
    )
    sensitivity = measured if measured is not None else sensitivity
    if collector is None:
        logger.warning("no calibration given: fitting weights in plain Frobenius norm (data-free)")
    method = "cospadi" if isinstance(config, DictionaryConfig) else "svd-llm"
    report = CompressionReport(method=method, target_ratio=config.compression_ratio)
    if collector is not None:
        report.gram_memory_bytes = collector.memory_bytes
        report.calibration_tokens = max((collector.tokens(name) for name in targets), default=0)
    new_weights: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            ratios = None
            if config.allocation == "knapsack" or sensitivity is not None:
                sensitivity = resolve_sensitivity(model, targets, calibration, sensitivity, progress)
            if config.allocation == "knapsack":
                ratios = allocate_ratios(units, targets, config, collector, sensitivity, progress)
            for label, unit in tqdm(units.items(), desc=f"compressing ({method})", disable=not progress):
                unit_config = config.for_layer(unit[0])
                if ratios is not None:
                    unit_config = dataclasses.replace(unit_config, compression_ratio=ratios[label])
                output_weights = solve_weights(config, unit, sensitivity)
                if len(unit) == 1:
                    weight = targets[unit[0]].weight.detach()
                    results = [compress_linear(unit[0], weight, unit_config, collector, output_weights=output_weights)]
                else:
                    grams = collector.grams(unit) if collector is not None else [None] * len(unit)
                    tokens = max(collector.tokens(name) for name in unit) if collector is not None else 0
                    shrinkages = [resolve_shrinkage(unit_config.gram_shrinkage, collector, name) for name in unit]
                    weights = [targets[name].weight.detach() for name in unit]
                    results = compress_group(
                        unit,
                        weights,
                        grams,
                        unit_config,
                        tokens,
                        shrinkages,
                        group=label,
                        output_weights=output_weights,
                    )
                for name, (tensor, layer_report) in zip(unit, results):
                    new_weights[name] = tensor
                    report.layers.append(layer_report)
    finally:
        if getattr(model, CALIBRATION_ATTR, None) is not None:
            getattr(model, CALIBRATION_ATTR).remove()
            delattr(model, CALIBRATION_ATTR)
    for name, tensor in new_weights.items():
        targets[name].weight = nn.Parameter(tensor, requires_grad=False)
    relink_shared(targets[name].weight for name in new_weights)
    report.seconds = time.perf_counter() - start
    _finish(model, config, report)
    return report


def _sparsify_sequential(
    model: nn.Module,
    config: DictionaryConfig | LowRankConfig,
    targets: dict[str, nn.Linear],
    units: dict[str, list[str]],
    calibration: Any,
    sensitivity: Optional[dict[str, torch.Tensor]],
    propagate: str,
    checkpoint_dir: Optional[str | os.PathLike],
    device: Optional[str | torch.device],
    progress: bool,
    start: float,
) -> CompressionReport:
    import time

    if calibration is None or isinstance(calibration, GramCollector):
        raise ValueError(
            "sequential / distributed / checkpointed compression needs calibration batches, not a prepared collector"
        )
    if any(
        isinstance(batch, dict) and batch.get("attention_mask") is not None and not bool(batch["attention_mask"].all())
        for batch in calibration
    ):
        raise ValueError(
            "sequential=True does not leave padding out of the Grams yet: pass unpadded sequences (no 0 in "
            "attention_mask)"
        )
    if sensitivity is not None:
        resolve_sensitivity(model, targets, calibration, sensitivity)  # checks it covers every Linear

    def unit_grams(
        members: list[str], collector: GramCollector
    ) -> tuple[list[Optional[torch.Tensor]], list[float], int]:
        """The members' Grams as the one-shot transform reads them, then released from the collector."""
        shrinkages = [resolve_shrinkage(config.for_layer(name).gram_shrinkage, collector, name) for name in members]
        tokens = max(collector.tokens(name) for name in members)
        return collector.grams(members, take=True), shrinkages, tokens

    def solve(
        label: str,
        members: list[str],
        weights: list[torch.Tensor],
        collector: GramCollector,
        ratio: Optional[float],
        run_sensitivity: Optional[dict[str, torch.Tensor]],
        crosses: Optional[list[torch.Tensor]],
    ) -> list[tuple[torch.Tensor, LayerReport]]:
        unit_config = config.for_layer(members[0])
        if ratio is not None:
            unit_config = dataclasses.replace(unit_config, compression_ratio=ratio)
        output_weights = solve_weights(config, members, sensitivity if run_sensitivity is None else run_sensitivity)
        grams, shrinkages, tokens = unit_grams(members, collector)
        if crosses is not None and any(cross is None for cross in crosses):
            crosses = None  # a member that never ran has no outputs to fit either
        if len(members) == 1:
            return [
                compress_weight(  # pop: the Gram is handed over, no reference may outlive its whitening
                    members[0],
                    weights[0],
                    grams.pop(),
                    unit_config,
                    tokens,
                    shrinkages[0],
                    overwrite_gram=True,
                    output_weights=output_weights,
                    cross=None if crosses is None else crosses.pop(),
                )
            ]
        return compress_group(
            members,
            weights,
            grams,
            unit_config,
            tokens,
            shrinkages,
            group=label,
            output_weights=output_weights,
            crosses=crosses,
        )

    def survey(
        label: str, members: list[str], weights: list[torch.Tensor], collector: GramCollector, sensitivity: dict
    ) -> dict:
        grams, shrinkages, _ = unit_grams(members, collector)
        menu, errors = tabulate_unit(
            config, members, weights, grams, shrinkages, sensitivity, overwrite_gram=len(members) == 1
        )
        return {"ratios": [c.ratio for c in menu], "bytes": [c.stored_bytes for c in menu], "errors": errors}

    def choose(tables: dict[str, dict]) -> dict[str, float]:
        picks = solve_knapsack(
            [t["bytes"] for t in tables.values()], [t["errors"] for t in tables.values()], byte_budget(targets, config)
        )
        return {label: table["ratios"][pick] for (label, table), pick in zip(tables.items(), picks)}

    allocation = GlobalAllocation(survey, choose, sensitivity) if config.allocation == "knapsack" else None
    with torch.no_grad(), eval_mode(model):
        layers, gram_bytes = run_sequential(
            model,
            config,
            targets,
            calibration,
            solve,
            units=units,
            allocation=allocation,
            propagate=propagate,
            checkpoint_dir=checkpoint_dir,
            device=device,
            progress=progress,
        )
    relink_shared(targets[name].weight for name in targets)
    method = "cospadi" if isinstance(config, DictionaryConfig) else "svd-llm"
    report = CompressionReport(method=method, target_ratio=config.compression_ratio, layers=layers)
    report.calibration_tokens = max((layer.calibration_tokens for layer in layers), default=0)
    report.gram_memory_bytes = gram_bytes
    report.seconds = time.perf_counter() - start
    return report
