"""Save and reload compressed models as a directory: config, tokenizer, safetensors, report.

Subclass weights are flattened into their inner tensors (``<key>.<inner>``) and a JSON manifest in
the safetensors metadata records how to rebuild each one: class, dtype, logical shape, the shape and
dtype of every inner tensor, and for a torchao-quantised dictionary its attributes (encoded with
torchao's own safetensors helpers; its tensors become ``<key>.dictionary.<inner>``). Reloading builds
the architecture on the meta device and assigns the stored tensors, so a compressed model never
materialises dense. The same per-weight entries are what ``spadi_ao.integrations.transformers``
records in ``config.json``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from spadi_ao.format import check_bitmask
from spadi_ao.grouping import relink_shared, storage_key
from spadi_ao.tensor import DictionaryTensor, LowRankTensor

__all__ = [
    "save_compressed",
    "load_compressed",
    "read_manifest",
    "flatten_state_dict",
    "unflatten_state_dict",
    "flatten_tensor",
    "unflatten_tensor",
    "check_stored_shapes",
    "CheckpointError",
    "WEIGHTS_NAME",
    "REPORT_NAME",
]

WEIGHTS_NAME = "spadi_model.safetensors"
REPORT_NAME = "spadi_report.json"
MANIFEST_KEY = "spadi_ao"
FORMAT_VERSION = 2
"""2 adds inner shapes/dtypes, nested torchao dictionaries and ``shared`` inner tensors (a group's one
dictionary, stored under its first member's key); version 1 files (names only) still load."""
_READABLE_VERSIONS = (1, 2)
_SUBCLASSES = {cls.__name__: cls for cls in (DictionaryTensor, LowRankTensor)}


class CheckpointError(ValueError):
    """A saved compressed model is missing, corrupted or does not match the architecture."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layout(value: torch.Tensor) -> dict[str, int]:
    if isinstance(value, DictionaryTensor):
        return {"k": value.num_atoms, "s": value.nonzeros_per_row}
    return {"rank": value.rank}


def _flatten_torchao(key: str, value: torch.Tensor) -> tuple[dict[str, torch.Tensor], str]:
    """torchao's own JSON for a quantised tensor's attributes, kept as a string (as torchao's safetensors
    metadata does) so that ``config.json`` writers cannot rewrite its nested ``dtype`` entries."""
    from torchao.prototype.safetensors.safetensors_utils import TensorSubclassAttributeJSONEncoder

    try:
        encoded = json.dumps(value, cls=TensorSubclassAttributeJSONEncoder)
    except TypeError:
        raise CheckpointError(f"{key}: torchao's safetensors support cannot encode a {type(value).__name__}") from None
    return {name: getattr(value, name) for name in json.loads(encoded)["_tensor_data_names"]}, encoded


def _unflatten_torchao(key: str, encoded: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    from torchao.prototype.safetensors.safetensors_utils import object_from_dict

    try:
        entry = json.loads(encoded)
        return object_from_dict({"_type": entry["_type"], "_data": {**entry["_data"], **tensors}})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{key}: cannot rebuild its torchao tensor ({exc})") from None


def flatten_tensor(key: str, value: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A compressed weight's plain inner tensors (names relative to ``key``) and its manifest entry."""
    names, attributes = value.__tensor_flatten__()
    tensors: dict[str, torch.Tensor] = {}
    nested: dict[str, Any] = {}
    for name in names:
        inner = getattr(value, name)
        if is_traceable_wrapper_subclass(inner):
            parts, nested[name] = _flatten_torchao(f"{key}.{name}", inner)
            tensors.update({f"{name}.{part}": tensor for part, tensor in parts.items()})
        else:
            tensors[name] = inner
    tensors = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    entry = {
        "type": type(value).__name__,
        "dtype": _dtype_name(attributes["dtype"]),
        "shape": list(value.shape),
        "layout": _layout(value),
        "tensors": {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in tensors.items()},
    }
    if nested:
        entry["nested"] = nested
    return tensors, entry


def _inner_specs(entry: dict[str, Any]) -> dict[str, Optional[dict[str, Any]]]:
    """Inner tensor name -> expected shape/dtype (None for version 1 entries, which list names only)."""
    specs = entry["tensors"]
    return specs if isinstance(specs, dict) else dict.fromkeys(specs)


def check_stored_shapes(key: str, entry: dict[str, Any], shapes: dict[str, list[int]]) -> None:
    """Every inner tensor of ``key`` is present with the shape its entry records (``shapes``: name -> shape)."""
    for name, spec in _inner_specs(entry).items():
        if name not in shapes:
            raise CheckpointError(
                f"{key}: the checkpoint lacks inner tensor {key}.{name}; the file is incomplete or corrupted"
            )
        if spec is not None and list(shapes[name]) != spec["shape"]:
            raise CheckpointError(
                f"{key}.{name}: stored shape {list(shapes[name])} does not match the recorded layout {spec['shape']}"
            )


def unflatten_tensor(key: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild the compressed weight ``key`` from its manifest entry and inner tensors (see :func:`flatten_tensor`)."""
    cls = _SUBCLASSES.get(entry.get("type"))
    if cls is None:
        raise CheckpointError(
            f"{key}: unknown compressed tensor type {entry.get('type')!r}; expected one of {sorted(_SUBCLASSES)}"
        )
    check_stored_shapes(key, entry, {name: list(t.shape) for name, t in tensors.items()})
    inner: dict[str, torch.Tensor] = {}
    nested_parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in entry.get("nested", {})}
    for name, spec in _inner_specs(entry).items():
        if spec is not None and _dtype_name(tensors[name].dtype) != spec["dtype"]:
            raise CheckpointError(
                f"{key}.{name}: stored dtype {_dtype_name(tensors[name].dtype)} does not match the recorded "
                f"{spec['dtype']}"
            )
        top, _, part = name.partition(".")
        if top in nested_parts:
            nested_parts[top][part] = tensors[name]
        else:
            inner[name] = tensors[name]
    for name, parts in nested_parts.items():
        inner[name] = _unflatten_torchao(f"{key}.{name}", entry["nested"][name], parts)
    try:
        required = [inner.pop(name) for name in cls.tensor_data_names]
        value = cls(*required, getattr(torch, entry["dtype"]), **inner)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{key}: inner tensors do not form a {cls.__name__} ({exc!r})") from None
    if list(value.shape) != entry["shape"]:
        raise CheckpointError(f"{key}: inner tensors give shape {list(value.shape)}, manifest says {entry['shape']}")
    check_loaded(key, value)
    return value


def check_loaded(key: str, value: torch.Tensor) -> None:
    """What a kernel assumes of a loaded weight and the shapes cannot show: each bitmask row's popcount."""
    if isinstance(value, DictionaryTensor):
        try:
            check_bitmask(value.bitmask, value.num_atoms, value.nonzeros_per_row)
        except ValueError as exc:
            raise CheckpointError(f"{key}: {exc}; the checkpoint is damaged") from None


def flatten_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain tensors for safetensors plus the manifest that rebuilds subclasses and tied aliases."""
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "subclasses": {}, "aliases": {}}
    seen: dict[tuple, str] = {}
    stored: dict[tuple, str] = {}  # storage of an inner tensor -> the key it is saved under
    for key, value in state.items():
        is_compressed = isinstance(value, tuple(_SUBCLASSES.values()))
        identity = (
            (id(value),) if is_compressed else (value.data_ptr(), tuple(value.shape), value.stride(), value.dtype)
        )
        if identity in seen and (is_compressed or value.numel() > 0):
            manifest["aliases"][key] = seen[identity]  # tied weights are stored once
            continue
        seen[identity] = key
        if is_compressed:
            inner, entry = flatten_tensor(key, value)
            for name, tensor in inner.items():
                storage = storage_key(tensor)
                if storage in stored:  # a dictionary shared by a group: stored once, referenced by the rest
                    entry.setdefault("shared", {})[name] = stored[storage]
                else:
                    stored[storage] = f"{key}.{name}"
                    tensors[f"{key}.{name}"] = tensor
            manifest["subclasses"][key] = entry
        else:
            tensors[key] = value.detach().contiguous()
    return tensors, manifest


def unflatten_state_dict(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    if manifest.get("format_version") not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"unsupported checkpoint format_version {manifest.get('format_version')!r}; this version reads "
            f"{list(_READABLE_VERSIONS)}"
        )
    state = dict(tensors)
    for key, entry in manifest["subclasses"].items():
        sources = {name: entry.get("shared", {}).get(name, f"{key}.{name}") for name in _inner_specs(entry)}
        missing = [source for source in sources.values() if source not in tensors]
        if missing:
            raise CheckpointError(
                f"{key}: the checkpoint lacks inner tensor {missing[0]}; the file is incomplete or corrupted"
            )
        state[key] = unflatten_tensor(key, entry, {name: tensors[source] for name, source in sources.items()})
        for source in sources.values():
            state.pop(source, None)
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    return state


def save_compressed(
    model: nn.Module, out_dir: str | Path, tokenizer: Any = None, report: Optional[dict] = None, overwrite: bool = False
) -> Path:
    """Write ``out_dir`` atomically: a temporary sibling is filled, then renamed into place."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"output directory {out_dir} exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = getattr(model, "config", None)
        if config is not None:
            config = copy.deepcopy(config)  # the live model keeps its quantization_config for save_pretrained
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        tensors, manifest = flatten_state_dict(model.state_dict())
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={MANIFEST_KEY: json.dumps(manifest)})
        if report is not None:
            (staging / REPORT_NAME).write_text(json.dumps(report, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def read_manifest(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """The manifest and each stored tensor's (shape, dtype), read without loading the weights."""
    from safetensors import safe_open

    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise CheckpointError(f"{path} is not a spadi-ao model directory: {WEIGHTS_NAME} is missing")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {
                key: (list(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                for key in handle.keys()
            }
    except Exception as exc:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"{file} cannot be read ({exc}); the file is corrupted") from None
    if MANIFEST_KEY not in metadata:
        raise CheckpointError(f"{file} has no spadi-ao manifest; it was not written by save_compressed")
    return json.loads(metadata[MANIFEST_KEY]), shapes


def load_compressed(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """Rebuild a model saved by :func:`save_compressed`; returns ``(model, tokenizer or None)``."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest, _ = read_manifest(path)
    try:
        tensors = load_file(str(path / WEIGHTS_NAME), device=str(device))
    except Exception as exc:
        raise CheckpointError(f"{path / WEIGHTS_NAME} cannot be loaded ({exc}); the file is corrupted") from None
    state = unflatten_state_dict(tensors, manifest)
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the {type(model).__name__} architecture: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    parameters: dict[int, nn.Parameter] = {}  # tied keys share one Parameter again
    for key, value in state.items():
        module_name, _, attribute = key.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, attribute)
        if tuple(current.shape) != tuple(value.shape):
            raise CheckpointError(
                f"{key}: stored shape {tuple(value.shape)} does not match the model's {tuple(current.shape)}"
            )
        if isinstance(current, nn.Parameter):
            parameter = parameters.setdefault(id(value), nn.Parameter(value, requires_grad=False))
            setattr(module, attribute, parameter)
        else:
            module.register_buffer(attribute, value)
    relink_shared(parameters.values())  # a group's members share one dictionary object again
    model.eval()
    if manifest["subclasses"]:  # save_pretrained, print(model) and get_memory_footprint as after compressing
        from spadi_ao.integrations.transformers import attach_quantizer

        attach_quantizer(model)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
