"""Cross-layer dictionaries: the layers of a group share one dictionary and keep their own codes.

A group's weights are stacked along outputs and whitened with the group's averaged Gram, so a single
dictionary in *input* space serves every member: one ``(k, in)`` tensor that each member's
``DictionaryTensor`` references, stored and counted once. Groups are named by a key function of the
layer's qualified name; layers whose key is None stay on their own.

* ``"paper"``: pairs of consecutive blocks share ``q, k, v, up, gate`` (one dictionary per projection
  type and pair); ``o`` and ``down`` stay per layer (CoSpaDi's cross-layer setting).
* ``"inputs"``: the Linears of one block that read the same input share: ``q, k, v`` and ``gate, up``.
  Their Grams are identical, so the shared whitening is exact and only the dictionary is traded.
"""

from __future__ import annotations

import re
from typing import Callable, Hashable, Iterable, Optional, Sequence, Union

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = [
    "GroupKeyFn",
    "Grouping",
    "GROUPINGS",
    "paper_group_key",
    "inputs_group_key",
    "group_layers",
    "average_gram",
    "split_bytes",
    "relink_shared",
    "share_dictionary",
    "storage_key",
]

GroupKeyFn = Callable[[str], Optional[Hashable]]
Grouping = Union[None, str, GroupKeyFn]

_BLOCK = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.(?P<rest>.*)$")


def _block(fqn: str) -> Optional[tuple[str, int, str]]:
    """``("model.layers.", 7, "self_attn.q_proj")`` for ``model.layers.7.self_attn.q_proj``."""
    match = _BLOCK.match(fqn)
    return (match["prefix"], int(match["index"]), match["rest"]) if match else None


def paper_group_key(fqn: str) -> Optional[Hashable]:
    """Blocks ``2i`` and ``2i + 1`` share each of q/k/v/up/gate; every other Linear is its own group."""
    parts = _block(fqn)
    if parts is None or not parts[2].endswith(("q_proj", "k_proj", "v_proj", "up_proj", "gate_proj")):
        return None
    prefix, index, rest = parts
    return f"{prefix}{index - index % 2}-{index - index % 2 + 1}.{rest}"


def inputs_group_key(fqn: str) -> Optional[Hashable]:
    """One block's q/k/v share a dictionary, and so do its gate/up: same input, same Gram."""
    parts = _block(fqn)
    if parts is None:
        return None
    prefix, index, rest = parts
    parent, _, leaf = rest.rpartition(".")
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{prefix}{index}.{parent}.qkv"
    if leaf in ("gate_proj", "up_proj"):
        return f"{prefix}{index}.{parent}.gate_up"
    return None


GROUPINGS: dict[str, GroupKeyFn] = {"paper": paper_group_key, "inputs": inputs_group_key}


def group_layers(names: Sequence[str], grouping: Grouping) -> dict[str, list[str]]:
    """Partition ``names`` into units, first-member order: group key (as text) -> members.

    Layers without a group key form a unit of their own, named by the layer; None groups nothing.
    """
    key_fn = None if grouping is None else GROUPINGS[grouping] if isinstance(grouping, str) else grouping
    groups: dict[Hashable, list[str]] = {}
    for name in names:
        key = None if key_fn is None else key_fn(name)
        groups.setdefault(("layer", name) if key is None else ("group", key), []).append(name)
    units: dict[str, list[str]] = {}
    for (kind, key), members in groups.items():
        label = str(key)
        if label in units:
            raise ValueError(f"group key {label!r} collides with another group or a layer name; return distinct keys")
        units[label] = members
    return units


def average_gram(grams: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The mean of the members' (mean) Grams, each member counted once; None when no member saw calibration data.

    Members reading one input hold the same Gram object (``GramCollector.grams``): that Gram is the mean
    itself, returned without a copy. Otherwise the sum is built in one new float64 matrix, never a stack of
    copies beside Grams that can be 512 MiB each.
    """
    present = [gram for gram in grams if gram is not None]
    if not present:
        return None
    if len(present) != len(grams):
        raise ValueError("some layers of a group saw calibration data and some did not; they cannot share a whitening")
    if all(gram is present[0] for gram in present):
        return present[0].to(torch.float64)
    total = present[0].to(torch.float64, copy=True)
    for gram in present[1:]:
        total.add_(gram)
    return total.div_(len(present))


def split_bytes(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` bytes split in proportion to ``weights`` into integers that sum exactly to ``total``."""
    whole = sum(weights)
    if whole <= 0:
        raise ValueError("split_bytes needs positive weights")
    shares, running = [], 0
    for weight in weights:
        start = total * running // whole
        running += weight
        shares.append(total * running // whole - start)
    return shares


def relink_shared(weights: Iterable[torch.Tensor], names: Sequence[str] = ("dictionary", "dictionary_scale")) -> None:
    """Point inner tensors that hold the same storage at one object again, in place.

    ``nn.Parameter`` detaches a tensor subclass, which gives every member of a group its own view of the
    shared dictionary; the bytes stay shared, and this restores the one shared *object* as well.
    """
    first: dict[tuple, torch.Tensor] = {}
    for weight in weights:
        for name in names:
            inner = getattr(weight, name, None)
            if inner is not None:
                setattr(weight, name, first.setdefault(storage_key(inner), inner))


def share_dictionary(
    weights: Sequence[torch.Tensor], names: Sequence[str] = ("dictionary", "dictionary_scale")
) -> None:
    """Point every member of a group at the first member's dictionary, in place.

    Members solved together share one dictionary; read back from a checkpoint or received from another rank,
    each holds its own equal copy, which would be kept in memory and stored once per member.
    """
    for weight in weights[1:]:
        for name in names:
            first, inner = getattr(weights[0], name, None), getattr(weight, name, None)
            if first is None or inner is first:
                continue
            if type(first) is torch.Tensor and not torch.equal(first, inner):
                raise ValueError(f"members of one group hold different {name}s: not from one solve")
            setattr(weight, name, first)


def storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for tensors that hold the same bytes; a tensor subclass is keyed by its inner tensors."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return (type(tensor),) + tuple(storage_key(getattr(tensor, name)) for name in names)
    pointer = tensor.untyped_storage().data_ptr()
    if pointer == 0:  # meta or empty: no bytes to share
        return (id(tensor),)
    return (pointer, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
