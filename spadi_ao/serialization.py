"""Save and reload compressed models as a directory: config, tokenizer, safetensors, report.

Subclass weights are flattened into their inner tensors (``<key>.<inner>``) and a JSON manifest in
the safetensors metadata records how to rebuild each one; reloading builds the architecture on the
meta device and assigns the stored tensors, so a compressed model never materialises dense.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from spadi_ao.tensor import DictionaryTensor, LowRankTensor

__all__ = ["save_compressed", "load_compressed", "read_manifest", "CheckpointError", "WEIGHTS_NAME", "REPORT_NAME"]

WEIGHTS_NAME = "spadi_model.safetensors"
REPORT_NAME = "spadi_report.json"
MANIFEST_KEY = "spadi_ao"
FORMAT_VERSION = 1
_SUBCLASSES = {cls.__name__: cls for cls in (DictionaryTensor, LowRankTensor)}


class CheckpointError(ValueError):
    """A saved compressed model is missing, corrupted or does not match the architecture."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def flatten_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain tensors for safetensors plus the manifest that rebuilds subclasses and tied aliases."""
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "subclasses": {}, "aliases": {}}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        is_compressed = isinstance(value, tuple(_SUBCLASSES.values()))
        identity = (id(value),) if is_compressed else (value.data_ptr(), tuple(value.shape), value.stride(), value.dtype)
        if identity in seen and (is_compressed or value.numel() > 0):
            manifest["aliases"][key] = seen[identity]  # tied weights are stored once
            continue
        seen[identity] = key
        if is_compressed:
            names, attributes = value.__tensor_flatten__()
            manifest["subclasses"][key] = {
                "type": type(value).__name__,
                "dtype": _dtype_name(attributes["dtype"]),
                "tensors": names,
                "shape": list(value.shape),
            }
            for name in names:
                tensors[f"{key}.{name}"] = getattr(value, name).contiguous()
        else:
            tensors[key] = value.detach().contiguous()
    return tensors, manifest


def unflatten_state_dict(tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format_version {manifest.get('format_version')!r}; expected {FORMAT_VERSION}")
    state = dict(tensors)
    for key, entry in manifest["subclasses"].items():
        cls = _SUBCLASSES.get(entry["type"])
        if cls is None:
            raise CheckpointError(f"{key}: unknown compressed tensor type {entry['type']!r}")
        try:
            inner = {name: state.pop(f"{key}.{name}") for name in entry["tensors"]}
        except KeyError as missing:
            raise CheckpointError(f"{key}: the checkpoint lacks inner tensor {missing}; the file is incomplete or corrupted") from None
        dtype = getattr(torch, entry["dtype"])
        required = [inner.pop(name) for name in cls.tensor_data_names]
        value = cls(*required, dtype, **inner)
        if list(value.shape) != entry["shape"]:
            raise CheckpointError(f"{key}: inner tensors give shape {list(value.shape)}, manifest says {entry['shape']}")
        state[key] = value
    for alias, target in manifest["aliases"].items():
        state[alias] = state[target]
    return state


def save_compressed(model: nn.Module, out_dir: str | Path, tokenizer: Any = None, report: Optional[dict] = None, overwrite: bool = False) -> Path:
    """Write ``out_dir`` atomically: a temporary sibling is filled, then renamed into place."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = getattr(model, "config", None)
        if config is not None:
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
            shapes = {key: (list(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype()) for key in handle.keys()}
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
            raise CheckpointError(f"{key}: stored shape {tuple(value.shape)} does not match the model's {tuple(current.shape)}")
        if isinstance(current, nn.Parameter):
            parameter = parameters.setdefault(id(value), nn.Parameter(value, requires_grad=False))
            setattr(module, attribute, parameter)
        else:
            module.register_buffer(attribute, value)
    model.eval()
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
