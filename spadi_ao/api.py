"""``sparsify_dictionary_``: the one-line, in-place transform (and its prepare step).

The only place that walks a model: select Linears, validate everything, gather Grams, compress each
layer into *new* tensors, and swap them in only once every layer has succeeded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from spadi_ao.budget import dictionary_budget, low_rank_budget
from spadi_ao.calibration import CALIBRATION_ATTR, GramCollector, attach_collector, run_calibration
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.layer import LayerReport, compress_weight
from spadi_ao.tensor import is_compressed_weight, stored_bytes

__all__ = ["sparsify_dictionary_", "prepare_calibration", "select_linears", "CompressionReport", "compression_stats"]

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


def _validate(targets: dict[str, nn.Linear], config: DictionaryConfig | LowRankConfig) -> None:
    """Every check that can fail, before any weight is touched."""
    for name, module in targets.items():
        weight = module.weight
        if is_compressed_weight(weight):
            raise ValueError(f"{name} is already compressed ({type(weight).__name__}); compress a dense model")
        if type(weight.data) is not torch.Tensor:
            raise ValueError(
                f"{name}.weight is a {type(weight.data).__name__} (already quantised?); sparsify_dictionary_ needs "
                "dense floating-point weights: compress first, then quantise"
            )
        if not weight.is_floating_point():
            raise ValueError(f"{name}.weight has dtype {weight.dtype}; a floating-point weight is required")
        if weight.is_meta:
            raise ValueError(f"{name}.weight is on the meta device; load the weights before compressing")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"{name}.weight has non-finite values (inf or nan); cannot compress it")
        layer_config = config.for_layer(name)
        out_features, in_features = weight.shape
        try:
            if isinstance(layer_config, DictionaryConfig):
                dictionary_budget(out_features, in_features, layer_config.compression_ratio, layer_config.rho, weight.element_size())
            else:
                low_rank_budget(out_features, in_features, layer_config.compression_ratio, weight.element_size())
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


def _collect(model: nn.Module, targets: dict[str, nn.Linear], calibration: Any, progress: bool) -> Optional[GramCollector]:
    prepared = getattr(model, CALIBRATION_ATTR, None)
    if isinstance(calibration, GramCollector):
        return calibration
    if calibration is None:
        return prepared
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]
    collector = GramCollector(targets)
    try:
        count = run_calibration(model, calibration, progress=progress)
    finally:
        collector.remove()
    if count == 0:
        raise ValueError("calibration is empty: pass at least one batch of input ids (or None for data-free fitting)")
    return collector


def _resolve_shrinkage(setting: float | str, collector: Optional[GramCollector], name: str) -> float:
    """A float setting is used as is; ``"auto"`` is estimated from the calibration sequences alone."""
    if setting != "auto":
        return float(setting)
    return collector.shrinkage(name) if collector is not None else 0.0


def sparsify_dictionary_(
    model: nn.Module,
    config: DictionaryConfig | LowRankConfig,
    filter_fn: Optional[FilterFn] = None,
    calibration: Optional[Iterable[Any] | GramCollector] = None,
    *,
    sequential: bool = False,
    propagate: str = "dense",
    checkpoint_dir: Optional[str | os.PathLike] = None,
    progress: bool = True,
) -> CompressionReport:
    """Compress the model's Linears in place; each weight becomes a Dictionary/LowRank tensor.

    ``calibration``: an iterable of input-id tensors (or dicts of model kwargs), a prepared
    :class:`GramCollector`, or None to use the one left by :func:`prepare_calibration` (if none was
    prepared, layers are fitted in weight space). Validation runs before any weight changes, and the
    new weights are swapped in only after every layer succeeded.

    ``sequential=True`` walks the decoder one block at a time (see ``spadi_ao.sequential``): only one
    block's Grams exist at once, ``propagate`` chooses whether later blocks see dense or compressed
    activations, and ``checkpoint_dir`` makes the run resumable. Called inside an initialised
    ``torch.distributed`` process group, the per-layer solves are split across ranks.
    """
    import time

    if not isinstance(config, (DictionaryConfig, LowRankConfig)):
        raise TypeError(f"config must be a DictionaryConfig or LowRankConfig, got {type(config).__name__}")
    if propagate not in ("dense", "compressed"):
        raise ValueError(f"propagate must be 'dense' or 'compressed', got {propagate!r}")
    start = time.perf_counter()
    targets = select_linears(model, filter_fn)
    if not targets:
        raise ValueError("no nn.Linear matched: check filter_fn (it receives (module, fully_qualified_name))")
    _validate(targets, config)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if sequential or checkpoint_dir is not None or distributed:
        return _sparsify_sequential(model, config, targets, calibration, propagate, checkpoint_dir, progress, start)
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
            for name, module in tqdm(targets.items(), desc=f"compressing ({method})", disable=not progress):
                layer_config = config.for_layer(name)
                gram = collector.gram(name) if collector is not None else None
                tokens = collector.tokens(name) if collector is not None else 0
                shrinkage = _resolve_shrinkage(layer_config.gram_shrinkage, collector, name)
                tensor, layer_report = compress_weight(name, module.weight.detach(), gram, layer_config, tokens, shrinkage)
                new_weights[name] = tensor
                report.layers.append(layer_report)
    finally:
        if getattr(model, CALIBRATION_ATTR, None) is not None:
            getattr(model, CALIBRATION_ATTR).remove()
            delattr(model, CALIBRATION_ATTR)
    for name, tensor in new_weights.items():
        targets[name].weight = nn.Parameter(tensor, requires_grad=False)
    report.seconds = time.perf_counter() - start
    return report


def _sparsify_sequential(
    model: nn.Module,
    config: DictionaryConfig | LowRankConfig,
    targets: dict[str, nn.Linear],
    calibration: Any,
    propagate: str,
    checkpoint_dir: Optional[str | os.PathLike],
    progress: bool,
    start: float,
) -> CompressionReport:
    import time

    from spadi_ao.sequential import run_sequential

    if calibration is None or isinstance(calibration, GramCollector):
        raise ValueError("sequential / distributed / checkpointed compression needs calibration batches, not a prepared collector")
    if isinstance(calibration, (torch.Tensor, dict)):
        calibration = [calibration]

    def solve(name: str, module: nn.Linear, collector: GramCollector) -> tuple[torch.Tensor, LayerReport]:
        layer_config = config.for_layer(name)
        shrinkage = _resolve_shrinkage(layer_config.gram_shrinkage, collector, name)
        return compress_weight(name, module.weight.detach(), collector.gram(name), layer_config, collector.tokens(name), shrinkage)

    with torch.no_grad():
        layers, collector = run_sequential(
            model, config, targets, calibration, solve, propagate=propagate, checkpoint_dir=checkpoint_dir, progress=progress
        )
    method = "cospadi" if isinstance(config, DictionaryConfig) else "svd-llm"
    report = CompressionReport(method=method, target_ratio=config.compression_ratio, layers=layers)
    report.calibration_tokens = max((layer.calibration_tokens for layer in layers), default=0)
    report.gram_memory_bytes = collector.memory_bytes if collector is not None else 0
    report.seconds = time.perf_counter() - start
    return report


def compression_stats(model: nn.Module) -> dict[str, Any]:
    """Per-layer and whole-model byte figures read from the model's current weights (also after reload)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_compressed_weight(module.weight):
            weight = module.weight
            dense = weight.shape[0] * weight.shape[1] * weight.element_size()
            stored = stored_bytes(weight)
            layers[name] = {"type": type(weight).__name__, "dense_bytes": dense, "stored_bytes": stored,
                            "compression_ratio": 1.0 - stored / dense}
    seen: set[int] = set()
    model_dense = model_stored = 0
    for parameter in list(model.parameters()) + list(model.buffers()):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        model_stored += stored_bytes(parameter.data if isinstance(parameter, nn.Parameter) else parameter)
        model_dense += parameter.numel() * parameter.element_size()
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
    }
