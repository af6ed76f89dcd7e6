"""``sparsify_dictionary_``: the one-line, in-place transform (and its prepare step).

The only place that walks a model: select Linears, validate everything, gather Grams, compress each
layer into *new* tensors, and swap them in only once every layer has succeeded.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from tqdm.auto import tqdm

from spadi_ao.allocation import Candidate, candidate_sizes, output_sensitivity, solve_knapsack, threshold_errors
from spadi_ao.budget import dictionary_budget, low_rank_budget
from spadi_ao.calibration import CALIBRATION_ATTR, GramCollector, attach_collector, run_calibration
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.grouping import group_layers, relink_shared, split_bytes, storage_key
from spadi_ao.inputs import calibration_batches, eval_mode
from spadi_ao.layer import (
    LayerReport,
    compress_group,
    compress_linear,
    compress_weight,
    resolve_shrinkage,
    whiten_group,
)
from spadi_ao.offload import dense_weight, offload_hook
from spadi_ao.tensor import is_compressed_weight

__all__ = [
    "sparsify_dictionary_",
    "prepare_calibration",
    "select_linears",
    "check_budget",
    "check_dense_weight",
    "CompressionReport",
    "compression_stats",
]

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class CompressionReport:
    """What the transform did: per-layer figures and totals over the compressed Linears."""

    method: str
    target_ratio: float
    layers: list[LayerReport] = field(default_factory=list)
    calibration_tokens: int = 0
    gram_memory_bytes: int = 0
    seconds: float = 0.0

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes for layer in self.layers)

    @property
    def compression_ratio(self) -> float:
        """Honest ratio over the compressed Linears, bytes as stored."""
        return 1.0 - self.stored_bytes / self.dense_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target_ratio": self.target_ratio,
            "compression_ratio": self.compression_ratio,
            "dense_bytes": self.dense_bytes,
            "stored_bytes": self.stored_bytes,
            "calibration_tokens": self.calibration_tokens,
            "gram_memory_bytes": self.gram_memory_bytes,
            "seconds": self.seconds,
            "layers": [layer.to_dict() for layer in self.layers],
        }


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


def check_dense_weight(name: str, weight: torch.Tensor) -> None:
    """A weight the solvers can take: dense, floating point, loaded and finite (else a ``ValueError``)."""
    if is_compressed_weight(weight):
        raise ValueError(f"{name} is already compressed ({type(weight).__name__}); compress a dense model")
    if type(weight.data) is not torch.Tensor:
        raise ValueError(
            f"{name}.weight is a {type(weight.data).__name__} (already quantised?); compression needs dense "
            "floating-point weights: compress first, then quantise"
        )
    if not weight.is_floating_point():
        raise ValueError(f"{name}.weight has dtype {weight.dtype}; a floating-point weight is required")
    if weight.is_meta:
        raise ValueError(f"{name}.weight is on the meta device; load the weights before compressing")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name}.weight has non-finite values (inf or nan); cannot compress it")


def _validate(targets: dict[str, nn.Linear], config: DictionaryConfig | LowRankConfig) -> None:
    """Every check that can fail, before any weight is touched."""
    for name, module in targets.items():
        weight = dense_weight(module)
        check_dense_weight(name, weight)
        if config.allocation == "knapsack" and "compression_ratio" not in config.overrides_for(name):
            continue  # the knapsack picks among the feasible candidates
        check_budget(name, weight, config.for_layer(name))


def check_budget(name: str, weight: torch.Tensor, config: DictionaryConfig | LowRankConfig) -> None:
    """``config.compression_ratio`` leaves this weight at least one atom / non-zero (or rank); else a ``ValueError``."""
    out_features, in_features = weight.shape
    try:
        if isinstance(config, DictionaryConfig):
            dictionary_budget(out_features, in_features, config.compression_ratio, config.rho, weight.element_size())
        else:
            low_rank_budget(out_features, in_features, config.compression_ratio, weight.element_size())
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _refuse_blockwise_only(targets: dict[str, nn.Linear], device: Optional[str | torch.device]) -> None:
    """What only the block-by-block driver handles: a compute device to move blocks to, offloaded weights."""
    if device is not None:
        raise ValueError("device= moves one decoder block at a time to it: it needs sequential=True")
    offloaded = [name for name, module in targets.items() if offload_hook(module) is not None]
    if offloaded:
        raise ValueError(
            f"{offloaded[0]} is offloaded by accelerate (cpu_offload, disk_offload or a device_map to 'cpu'/'disk'): "
            "the one-shot transform would load every weight at once; compress it with sequential=True"
        )


def _nothing_selected(model: nn.Module) -> str:
    """Why no Linear was selected; GPT-2 style models keep their projections in transformers' ``Conv1D``."""
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    if conv1d:
        return (
            f"this model keeps its projections in transformers' Conv1D ({len(conv1d)} layers, e.g. {conv1d[0]}), "
            "which spadi-ao does not support yet: only nn.Linear layers can be compressed"
        )
    return "no nn.Linear matched: check filter_fn (it receives (module, fully_qualified_name))"


def _check_overrides(targets: dict[str, nn.Linear], config: DictionaryConfig | LowRankConfig) -> None:
    """A ``layer_overrides`` pattern that matches no selected Linear is a typo or meant for another model;
    silently compressing with the default settings instead would be irreversible, so it raises."""
    for pattern in config.layer_overrides:
        if not any(re.search(pattern, name) for name in targets):
            examples = ", ".join(list(targets)[:3])
            raise ValueError(
                f"layer_overrides pattern {pattern!r} matches none of the {len(targets)} selected Linears (e.g. "
                f"{examples}); fix the pattern (re.search on the module name) or remove it"
            )


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
    model: nn.Module, targets: dict[str, nn.Linear], calibration: Any, progress: bool
) -> Optional[GramCollector]:
    prepared = getattr(model, CALIBRATION_ATTR, None)
    if isinstance(calibration, GramCollector):
        return calibration
    if calibration is None:
        return prepared
    collector = GramCollector(targets, model=model)
    try:
        run_calibration(model, calibration, progress=progress)
    finally:
        collector.remove()
    return collector


def _tabulate(
    config: DictionaryConfig | LowRankConfig,
    unit: list[str],
    weights: list[torch.Tensor],
    grams: list[Optional[torch.Tensor]],
    shrinkages: list[float],
    sensitivity: dict[str, torch.Tensor],
    overwrite_gram: bool = False,
) -> tuple[list[Candidate], list[float]]:
    """One unit's knapsack menu and the loss-weighted error of each candidate (see ``spadi_ao.allocation``)."""
    unit_config = config.for_layer(unit[0])
    pinned = "compression_ratio" in config.overrides_for(unit[0])
    ratios = (unit_config.compression_ratio,) if pinned else config.allocation_candidates
    menu = candidate_sizes(
        unit_config, sum(w.shape[0] for w in weights), weights[0].shape[1], weights[0].element_size(), ratios
    )
    if not menu:
        raise ValueError(f"{unit[0]}: no ratio in allocation_candidates leaves k, s >= 1; add smaller candidates")
    _, whitened, _ = whiten_group(weights, grams, unit_config, shrinkages, overwrite_gram)
    column_weights = torch.cat([sensitivity[name].to(torch.float64) for name in unit]).to(whitened.device)
    return menu, threshold_errors(whitened, [(c.k, c.s) for c in menu], column_weights)


def _byte_budget(targets: dict[str, nn.Linear], config: DictionaryConfig | LowRankConfig) -> int:
    """The whole-model budget: ``1 - compression_ratio`` of the selected Linears' dense bytes."""
    dense = sum(module.weight.numel() * module.weight.element_size() for module in targets.values())
    return int((1.0 - config.compression_ratio) * dense)


def _allocate(
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
        grams = [collector.gram(name) if collector is not None else None for name in unit]
        shrinkages = [resolve_shrinkage(unit_config.gram_shrinkage, collector, name) for name in unit]
        menu, unit_errors = _tabulate(config, unit, weights, grams, shrinkages, sensitivity)
        errors.append(unit_errors)
        costs.append([c.stored_bytes for c in menu])
        menus.append(menu)
    picks = solve_knapsack(costs, errors, _byte_budget(targets, config))
    return {label: menu[pick].ratio for label, menu, pick in zip(units, menus, picks)}


def _sensitivity(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    calibration: Any,
    given: Optional[dict[str, torch.Tensor]],
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    if given is not None:
        missing = sorted(set(targets) - set(given))
        if missing:
            raise ValueError(f"sensitivity lacks {missing[:3]}; give one tensor (out_features,) per compressed Linear")
        return given
    if not _has_language_model_loss(model, calibration):
        # No causal-LM loss to differentiate (a prepared collector, no calibration, or not a language model fed
        # token ids): every output counts alike, so the knapsack still spends the whole-model budget where the
        # whitened error is lowest, without the loss' weighting.
        logger.warning(
            "allocation='knapsack' without token-id batches of a causal LM: weighing every output alike (pass them, or "
            "sensitivity=spadi_ao.allocation.output_sensitivity(model, modules, batches), for the loss-weighted choice)"
        )
        return {name: torch.ones(module.weight.shape[0]) for name, module in targets.items()}
    return output_sensitivity(model, targets, calibration, progress=progress)


def _has_language_model_loss(model: nn.Module, calibration: Any) -> bool:
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
    whether later blocks see dense or compressed activations (``"compressed"``, the default: later blocks are
    calibrated on what they will really see; ``docs/results.md`` measures both), and ``checkpoint_dir`` makes
    the run resumable. Called inside an initialised
    ``torch.distributed`` process group, the per-layer solves are split across ranks. ``device`` (e.g.
    ``"cuda"``) is where each block is moved to be calibrated and solved, one at a time, while the model
    stays where it is. Models dispatched by accelerate (``device_map``, ``cpu_offload``, ``disk_offload``)
    are compressed where their hooks run them, without loading more than a block (see ``spadi_ao.offload``);
    they need ``sequential=True``.

    ``config.allocation="knapsack"`` chooses per-layer ratios that meet the whole-model byte budget; it
    weighs errors by each output's loss sensitivity, computed from the calibration batches (a backward
    pass each) unless ``sensitivity`` (fqn -> (out_features,), see ``spadi_ao.allocation``) is given; with a
    prepared collector or no calibration there is no loss to differentiate, and every output weighs alike (a
    one-line warning says so). ``config.grouping`` makes groups of layers share one dictionary. Both work block
    by block too: a first pass gathers every unit's candidate errors (dense propagation, one block's Grams at a
    time; the backward recomputes one block at a time), the knapsack is solved once, then the blocks are
    compressed; with ``propagate="dense"`` the result is the one-shot transform's. Groups must lie inside one
    block there (``grouping="inputs"``; ``"paper"`` pairs blocks and needs ``sequential=False``).

    torchao's ``quantize_(model, config)`` runs the same per-layer step (``spadi_ao.layer.compress_linear``)
    on each selected Linear, without the whole-model features: each layer at ``compression_ratio``, its own
    dictionary (see ``spadi_ao.transform``).
    """
    import time

    if not isinstance(config, (DictionaryConfig, LowRankConfig)):
        raise TypeError(f"config must be a DictionaryConfig or LowRankConfig, got {type(config).__name__}")
    if propagate not in ("dense", "compressed"):
        raise ValueError(f"propagate must be 'dense' or 'compressed', got {propagate!r}")
    start = time.perf_counter()
    targets = select_linears(model, filter_fn)
    if not targets:
        raise ValueError(_nothing_selected(model))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    blockwise = sequential or checkpoint_dir is not None or distributed
    if not blockwise:
        _refuse_blockwise_only(targets, device)
    _validate(targets, config)
    _check_overrides(targets, config)
    if calibration is not None and not isinstance(calibration, GramCollector):
        calibration = calibration_batches(calibration, model)
    units = _units(targets, config)
    if blockwise:
        report = _sparsify_sequential(
            model, config, targets, units, calibration, sensitivity, propagate, checkpoint_dir, device, progress, start
        )
        _finish(model, config, report)
        return report
    if (
        config.allocation == "knapsack"
        and sensitivity is None
        and calibration is not None
        and not isinstance(calibration, GramCollector)
    ):
        sensitivity = _sensitivity(model, targets, calibration, None, progress)
    collector = _collect(model, targets, calibration, progress)
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
            if config.allocation == "knapsack":
                ratios = _allocate(
                    units,
                    targets,
                    config,
                    collector,
                    _sensitivity(model, targets, calibration, sensitivity, progress),
                    progress,
                )
            for label, unit in tqdm(units.items(), desc=f"compressing ({method})", disable=not progress):
                unit_config = config.for_layer(unit[0])
                if ratios is not None:
                    unit_config = dataclasses.replace(unit_config, compression_ratio=ratios[label])
                if len(unit) == 1:
                    results = [compress_linear(unit[0], targets[unit[0]].weight.detach(), unit_config, collector)]
                else:
                    grams = [collector.gram(name) if collector is not None else None for name in unit]
                    tokens = max(collector.tokens(name) for name in unit) if collector is not None else 0
                    shrinkages = [resolve_shrinkage(unit_config.gram_shrinkage, collector, name) for name in unit]
                    weights = [targets[name].weight.detach() for name in unit]
                    results = compress_group(unit, weights, grams, unit_config, tokens, shrinkages, group=label)
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

    from spadi_ao.sequential import GlobalAllocation, run_sequential

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
        _sensitivity(model, targets, calibration, sensitivity)  # checks it covers every Linear

    def unit_grams(
        members: list[str], collector: GramCollector
    ) -> tuple[list[Optional[torch.Tensor]], list[float], int]:
        """The members' Grams as the one-shot transform reads them, then released from the collector."""
        shrinkages = [resolve_shrinkage(config.for_layer(name).gram_shrinkage, collector, name) for name in members]
        tokens = max(collector.tokens(name) for name in members)
        if len(members) == 1:
            return [collector.take(members[0])], shrinkages, tokens
        grams = [collector.gram(name) for name in members]
        for name in members:
            collector.release(name)
        return grams, shrinkages, tokens

    def solve(
        label: str, members: list[str], weights: list[torch.Tensor], collector: GramCollector, ratio: Optional[float]
    ) -> list[tuple[torch.Tensor, LayerReport]]:
        unit_config = config.for_layer(members[0])
        if ratio is not None:
            unit_config = dataclasses.replace(unit_config, compression_ratio=ratio)
        grams, shrinkages, tokens = unit_grams(members, collector)
        if len(members) == 1:
            return [
                compress_weight(
                    members[0], weights[0], grams[0], unit_config, tokens, shrinkages[0], overwrite_gram=True
                )
            ]
        return compress_group(members, weights, grams, unit_config, tokens, shrinkages, group=label)

    def survey(
        label: str, members: list[str], weights: list[torch.Tensor], collector: GramCollector, sensitivity: dict
    ) -> dict:
        grams, shrinkages, _ = unit_grams(members, collector)
        menu, errors = _tabulate(
            config, members, weights, grams, shrinkages, sensitivity, overwrite_gram=len(members) == 1
        )
        return {"ratios": [c.ratio for c in menu], "bytes": [c.stored_bytes for c in menu], "errors": errors}

    def choose(tables: dict[str, dict]) -> dict[str, float]:
        picks = solve_knapsack(
            [t["bytes"] for t in tables.values()], [t["errors"] for t in tables.values()], _byte_budget(targets, config)
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


def _leaves(tensor: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """The plain tensors a (possibly nested subclass) tensor holds."""
    if tensor is None:
        return []
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [leaf for name in names for leaf in _leaves(getattr(tensor, name))]
    return [tensor]


def _resident_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``' plain leaves: what they keep allocated right now
    (a view keeps its whole buffer alive; tensors sharing one buffer count it once)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        for leaf in _leaves(tensor.data if isinstance(tensor, nn.Parameter) else tensor):
            storage = leaf.untyped_storage()
            storages[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(storages.values())


def compression_stats(model: nn.Module) -> dict[str, Any]:
    """Per-layer and whole-model byte figures read from the model's current weights (also after reload).

    Inner tensors shared between weights (a group's dictionary) are counted once in the totals; each
    layer's figure holds its own tensors plus a share of the shared ones in proportion to its outputs.
    ``*_resident_bytes`` are the bytes those weights keep allocated right now, their storages as held:
    the kernels keep no dense copy or other cache of a weight between calls, so after any forward pass
    they equal the stored bytes unless a weight is a view into a larger buffer.
    """
    compressed = {
        name: module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_compressed_weight(module.weight)
    }
    users: dict[tuple, list[str]] = {}
    sizes: dict[tuple, int] = {}
    for name, weight in compressed.items():
        for leaf in _leaves(weight.data if isinstance(weight, nn.Parameter) else weight):
            key = storage_key(leaf)
            users.setdefault(key, []).append(name)
            sizes[key] = leaf.numel() * leaf.element_size()
    stored_by_layer = dict.fromkeys(compressed, 0)
    for key, names in users.items():
        for name, share in zip(names, split_bytes(sizes[key], [compressed[n].shape[0] for n in names])):
            stored_by_layer[name] += share
    layers = {}
    for name, weight in compressed.items():
        dense = weight.shape[0] * weight.shape[1] * weight.element_size()
        stored = stored_by_layer[name]
        layers[name] = {
            "type": type(weight).__name__,
            "dense_bytes": dense,
            "stored_bytes": stored,
            "compression_ratio": 1.0 - stored / dense,
        }
    counted: set[tuple] = set()
    seen: set[int] = set()
    model_dense = model_stored = 0
    for parameter in list(model.parameters()) + list(model.buffers()):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        model_dense += parameter.numel() * parameter.element_size()
        for leaf in _leaves(parameter.data if isinstance(parameter, nn.Parameter) else parameter):
            key = storage_key(leaf)
            if key not in counted:
                counted.add(key)
                model_stored += leaf.numel() * leaf.element_size()
    dense = sum(v["dense_bytes"] for v in layers.values())
    stored = sum(v["stored_bytes"] for v in layers.values())
    return {
        "layers": layers,
        "compressed_dense_bytes": dense,
        "compressed_stored_bytes": stored,
        "linear_compression_ratio": 1.0 - stored / dense if dense else 0.0,
        "model_dense_bytes": model_dense,
        "model_stored_bytes": model_stored,
        "model_compression_ratio": 1.0 - model_stored / model_dense if model_dense else 0.0,
        "compressed_resident_bytes": _resident_bytes(list(compressed.values())),
        "model_resident_bytes": _resident_bytes(list(model.parameters()) + list(model.buffers())),
    }
