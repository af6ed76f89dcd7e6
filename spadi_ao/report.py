"""What a compression did and what a model holds: ``CompressionReport`` and ``compression_stats``.

Kept apart from the transform so that anything reading bytes off a model (the command line, the saved
report, a benchmark) needs only the tensors and the per-layer ``LayerReport``, never the drivers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from spadi_ao.grouping import split_bytes, storage_key
from spadi_ao.layer import LayerReport
from spadi_ao.tensor import is_compressed_weight

__all__ = ["CompressionReport", "compression_stats"]


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
