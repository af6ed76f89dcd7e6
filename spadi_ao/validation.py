"""The checks ``sparsify_dictionary_`` runs before any weight changes, and the messages they raise.

Compression replaces weights in place and cannot be undone, so everything that can be known to fail (a
weight the solvers cannot take, a ratio that leaves no atom, a ``layer_overrides`` typo, a model only the
block-by-block driver can handle) raises here, naming the layer and the fix, while the model is untouched.
``transform.py`` runs the per-weight checks for torchao's ``quantize_`` too.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from spadi_ao.budget import dictionary_budget, low_rank_budget
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.offload import dense_weight, offload_hook
from spadi_ao.tensor import is_compressed_weight

__all__ = [
    "check_dense_weight",
    "check_budget",
    "check_targets",
    "check_overrides",
    "refuse_blockwise_only",
    "nothing_selected_message",
]


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


def check_targets(targets: dict[str, nn.Linear], config: DictionaryConfig | LowRankConfig) -> None:
    """Every check that can fail, before any weight is touched."""
    for name, module in targets.items():
        weight = dense_weight(module)
        check_dense_weight(name, weight)
        if config.allocation == "knapsack" and "compression_ratio" not in config.overrides_for(name):
            continue  # the knapsack picks among the feasible candidates
        check_budget(name, weight, config.for_layer(name))


def check_overrides(targets: dict[str, nn.Linear], config: DictionaryConfig | LowRankConfig) -> None:
    """A ``layer_overrides`` pattern that matches no selected Linear is a typo or meant for another model;
    silently compressing with the default settings instead would be irreversible, so it raises."""
    for pattern in config.layer_overrides:
        if not any(re.search(pattern, name) for name in targets):
            examples = ", ".join(list(targets)[:3])
            raise ValueError(
                f"layer_overrides pattern {pattern!r} matches none of the {len(targets)} selected Linears (e.g. "
                f"{examples}); fix the pattern (re.search on the module name) or remove it"
            )


def refuse_blockwise_only(targets: dict[str, nn.Linear], device: Optional[str | torch.device]) -> None:
    """What only the block-by-block driver handles: a compute device to move blocks to, offloaded weights."""
    if device is not None:
        raise ValueError("device= moves one decoder block at a time to it: it needs sequential=True")
    offloaded = [name for name, module in targets.items() if offload_hook(module) is not None]
    if offloaded:
        raise ValueError(
            f"{offloaded[0]} is offloaded by accelerate (cpu_offload, disk_offload or a device_map to 'cpu'/'disk'): "
            "the one-shot transform would load every weight at once; compress it with sequential=True"
        )


def nothing_selected_message(model: nn.Module) -> str:
    """Why no Linear was selected; GPT-2 style models keep their projections in transformers' ``Conv1D``."""
    conv1d = [name for name, module in model.named_modules() if type(module).__name__ == "Conv1D"]
    if conv1d:
        return (
            f"this model keeps its projections in transformers' Conv1D ({len(conv1d)} layers, e.g. {conv1d[0]}), "
            "which spadi-ao does not support yet: only nn.Linear layers can be compressed"
        )
    return "no nn.Linear matched: check filter_fn (it receives (module, fully_qualified_name))"
