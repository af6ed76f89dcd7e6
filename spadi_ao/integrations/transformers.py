"""``save_pretrained`` / ``from_pretrained`` of compressed models through transformers' quantizer registry.

transformers' ``TorchAoConfig`` only accepts torchao's own classes, so compressed weights get their own
quantization method, ``"spadi_ao"``. ``SpadiAoConfig`` lands in ``config.json`` with one entry per compressed
weight, the manifest entry of ``spadi_ao.serialization`` (class, dtype, ``k``/``s`` or ``rank``, the shape and
dtype of every inner tensor, a torchao dictionary's attributes). ``save_pretrained`` writes the inner tensors
as ``<weight>.<inner>`` safetensors keys; ``from_pretrained`` checks the checkpoint's headers against
``config.json`` before reading any data, then rebuilds each weight from its inner tensors on the model that
transformers builds on the meta device, so nothing is ever materialised dense.

``sparsify_dictionary_`` attaches the quantizer to a ``PreTrainedModel`` it compressed (:func:`attach_quantizer`),
so ``model.save_pretrained`` works at once; a loaded model has it from ``from_pretrained``.

Each compressed weight's own key holds a one-byte ``uint8`` marker of shape (1,), never a dense weight: read by
transformers without ``import spadi_ao`` (the quantization method unknown), the checkpoint's shapes do not match
the model's and ``from_pretrained`` raises, instead of returning a model on randomly initialised weights.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from spadi_ao.grouping import storage_key
from spadi_ao.serialization import (
    FORMAT_VERSION,
    CheckpointError,
    check_loaded,
    check_stored_shapes,
    flatten_state_dict,
    unflatten_tensor,
)
from spadi_ao.tensor import is_compressed_weight
from spadi_ao.tensor_ops import describe_linears, inner_tensors

__all__ = ["QUANT_METHOD", "SpadiAoConfig", "SpadiAoHfQuantizer", "attach_quantizer", "compression_record"]

QUANT_METHOD = "spadi_ao"
MARKER_DTYPE = torch.uint8
"""The marker stored under each compressed weight's own key (see the module docstring)."""


class SpadiAoConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a compressed model: ``layers`` maps each compressed weight's state-dict
    key to its layout; it is filled from the model when ``save_pretrained`` runs. ``compression`` records how the
    model was compressed (:func:`compression_record`), for ``spadi-ao info``."""

    def __init__(
        self,
        layers: Optional[dict[str, dict[str, Any]]] = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        compression: Optional[dict[str, Any]] = None,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"SpadiAoConfig needs quant_method={QUANT_METHOD!r}, got {quant_method!r}")
        if format_version != FORMAT_VERSION:
            raise CheckpointError(
                f"unsupported spadi_ao format_version {format_version!r} in config.json; expected {FORMAT_VERSION}"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = dict(layers or {})
        self.compression = dict(compression or {})


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return repr(value)  # e.g. a torchao config for the dictionary


def compression_record(config: Any, report: Any) -> dict[str, Any]:
    """How a model was compressed: the method, every config field, the ratios and the calibration tokens."""
    return {
        "method": report.method,
        "config_type": type(config).__name__,
        "config": _jsonable({field.name: getattr(config, field.name) for field in dataclasses.fields(config)}),
        "target_ratio": report.target_ratio,
        "compression_ratio": report.compression_ratio if report.layers else None,
        "calibration_tokens": report.calibration_tokens,
    }


def _source_pattern(param: str, name: str) -> str:
    """transformers matches checkpoint keys with regexes; escaped, ``dictionary.scale`` cannot match
    ``dictionary_scale``."""
    return re.escape(f"{param}.{name}")


def _marker_pattern(key: str) -> str:
    """Matches the marker under ``key`` itself and no other weight of that name (a lookbehind on its module)."""
    module_name, _, param = key.rpartition(".")
    return f"(?<={re.escape(module_name + '.')}){re.escape(param)}$"


def _compressed_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if is_compressed_weight(value)}


def _sources(key: str, entry: dict[str, Any]) -> dict[str, str]:
    """Inner name -> checkpoint key holding it: its own, or an earlier weight's for a dictionary shared by a group."""
    return {name: entry.get("shared", {}).get(name, f"{key}.{name}") for name in entry["tensors"]}


def _owned(key: str, entry: dict[str, Any]) -> list[str]:
    return [name for name, source in _sources(key, entry).items() if source == f"{key}.{name}"]


class SpadiAoDeserialize(ConversionOps):
    """Collects one weight's ``<weight>.<inner>`` tensors and rebuilds the compressed tensor."""

    def __init__(self, hf_quantizer: "SpadiAoHfQuantizer"):
        self.hf_quantizer = hf_quantizer  # also tells transformers not to cast the inner tensors

    def convert(
        self, input_dict: dict[str, list[torch.Tensor]], full_layer_name: Optional[str] = None, **kwargs
    ) -> dict[str, torch.Tensor]:
        entry = self.hf_quantizer.quantization_config.layers.get(full_layer_name)
        if entry is None:
            raise CheckpointError(
                f"{full_layer_name}: the checkpoint holds compressed parts that config.json does not list"
            )
        param = full_layer_name.rpartition(".")[2]
        collected = {name: input_dict.get(_source_pattern(param, name)) for name in _owned(full_layer_name, entry)}
        tensors = {name: values[0] for name, values in collected.items() if values}
        # Parts shared with another weight arrive with that weight: a meta placeholder until _relink_shared.
        for name in entry.get("shared", {}):
            spec = entry["tensors"][name]
            tensors[name] = torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]), device="meta")
        return {full_layer_name: unflatten_tensor(full_layer_name, entry, tensors)}


class SpadiAoHfQuantizer(HfQuantizer):
    """Loads (and re-saves) compressed checkpoints; compression itself needs calibration, so it never runs here."""

    requires_calibration = True
    quantization_config: SpadiAoConfig

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """``from_pretrained(dtype=...)``: the stored floating-point parts are converted to it after loading."""
        self.target_dtype = dtype
        return dtype

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: Optional[list[str]] = None, **kwargs
    ) -> nn.Module:
        """Every listed weight exists with its shape, and the checkpoint holds its inner tensors with theirs."""
        layers = self.quantization_config.layers
        for key, entry in layers.items():
            module_name, _, attribute = key.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise CheckpointError(
                    f"config.json lists compressed weight {key}, which the {type(model).__name__} does not have"
                ) from None
            current = getattr(module, attribute, None)
            if not isinstance(module, nn.Linear) or current is None or list(current.shape) != entry["shape"]:
                raise CheckpointError(
                    f"config.json lists {key} as a {entry['shape']} Linear weight; the model has {module}"
                )
        if checkpoint_files:
            stored = _stored_shapes(checkpoint_files)
            for key, entry in layers.items():
                sources = _sources(key, entry)
                check_stored_shapes(
                    key, entry, {name: stored[source] for name, source in sources.items() if source in stored}
                )
        return model

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        """``{"weight": ["weight\\.dictionary", ...]}``: the (escaped) key suffixes that load into one
        compressed weight."""
        names: dict[str, set[str]] = {}
        for key, entry in self.quantization_config.layers.items():
            param = key.rpartition(".")[2]
            names.setdefault(param, set()).update(_source_pattern(param, name) for name in _owned(key, entry))
            names[param].add(_marker_pattern(key))
        return {param: sorted(suffixes) for param, suffixes in names.items()}

    def get_load_operations(self) -> dict:
        return {"deserialize": SpadiAoDeserialize}

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        for key, entry in self.quantization_config.layers.items():
            weight = model.get_parameter(key)
            if type(weight).__name__ != entry["type"]:
                raise CheckpointError(
                    f"{key} was not loaded as a {entry['type']} (got {type(weight).__name__}); the checkpoint is "
                    "incomplete"
                )
            weight.requires_grad_(False)
            check_loaded(key, weight)
        _convert_dtype(model, self.quantization_config.layers, getattr(self, "target_dtype", None))
        _relink_shared(model, self.quantization_config.layers)
        _show_stored(model)
        # save_pretrained re-flattens through get_state_dict_and_metadata; our loading step has no reverse to replay.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions is not None:
            model._weight_conversions = [
                conversion
                for conversion in conversions
                if not any(isinstance(op, SpadiAoDeserialize) for op in getattr(conversion, "operations", ()))
            ]
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Compressed weights become their inner tensors (a shared dictionary once); layouts go to ``config.json``."""
        compressed = _compressed_weights(model)
        inner, manifest = flatten_state_dict(compressed)
        state = {key: value for key, value in model.state_dict().items() if key not in compressed}
        state.update(inner)
        state.update({key: torch.zeros(1, dtype=MARKER_DTYPE) for key in compressed})
        self.quantization_config.layers = manifest["subclasses"]
        return state, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _relink_shared(model: nn.Module, layers: dict[str, dict[str, Any]]) -> None:
    """Point each shared part (a group's dictionary) at the very tensor its owner loaded, replacing the placeholder."""
    for key, entry in layers.items():
        shared = entry.get("shared", {})
        weight = model.get_parameter(key)
        for top in {name.partition(".")[0] for name in shared}:
            parts = [name for name in entry["tensors"] if name.partition(".")[0] == top]
            owners = {shared[name].removesuffix(f".{name}") if name in shared else None for name in parts}
            owner = owners.pop() if len(owners) == 1 else None
            if owner not in layers:
                raise CheckpointError(
                    f"{key}.{top}: config.json shares it only in part or with an unknown weight ({shared})"
                )
            setattr(weight, top, getattr(model.get_parameter(owner), top))


def _convert_dtype(model: nn.Module, layers: dict[str, dict[str, Any]], dtype: Optional[torch.dtype]) -> None:
    """Compressed weights in the dtype ``from_pretrained`` was given (before a group's dictionary is shared again)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return
    for key in layers:
        module_name, _, attribute = key.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attribute)
        if weight.dtype != dtype:
            setattr(module, attribute, nn.Parameter(weight.to(dtype), requires_grad=False))


def _stored_footprint(model: nn.Module, return_buffers: bool = True) -> int:
    """``get_memory_footprint`` in bytes held: compressed weights by their stored parts, shared ones once."""
    tensors = list(model.parameters()) + (list(model.buffers()) if return_buffers else [])
    counted: set[tuple] = set()
    total = 0
    for tensor in tensors:
        for leaf in inner_tensors(tensor.data if isinstance(tensor, nn.Parameter) else tensor):
            key = storage_key(leaf)
            if key not in counted:
                counted.add(key)
                total += leaf.numel() * leaf.element_size()
    return total


def _show_stored(model: nn.Module) -> None:
    """``print(model)`` and ``model.get_memory_footprint()`` describe the weights as stored."""
    describe_linears(model)
    model.get_memory_footprint = functools.partial(_stored_footprint, model)  # unlike a bound method, pickles


def _stored_shapes(checkpoint_files: list[str]) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for file in checkpoint_files:
        try:
            with safe_open(file, framework="pt") as handle:
                shapes.update({key: list(handle.get_slice(key).get_shape()) for key in handle.keys()})
        except Exception as exc:  # safetensors raises its own error types for truncated headers
            raise CheckpointError(f"{file} cannot be read ({exc}); the file is corrupted") from None
    return shapes


def attach_quantizer(model: nn.Module, compression: Optional[dict[str, Any]] = None) -> SpadiAoHfQuantizer:
    """Give a model compressed in this process what ``from_pretrained`` gives a loaded one, so that
    ``model.save_pretrained(path)`` writes it and ``AutoModelForCausalLM.from_pretrained(path)`` reads it back.

    ``sparsify_dictionary_`` calls it on a ``PreTrainedModel``; call it yourself after changing the weights
    otherwise. ``compression``: the :func:`compression_record` to keep in ``config.json`` (an earlier one stays)."""
    if not _compressed_weights(model):
        raise ValueError("the model has no compressed weights: run sparsify_dictionary_ before attach_quantizer")
    previous = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if compression is None and isinstance(previous, SpadiAoConfig):
        compression = previous.compression
    quantizer = SpadiAoHfQuantizer(SpadiAoConfig(compression=compression), pre_quantized=True)
    quantizer.get_state_dict_and_metadata(model)  # records the layout now, as a loaded model has it
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return quantizer


register_quantization_config(QUANT_METHOD)(SpadiAoConfig)
register_quantizer(QUANT_METHOD)(SpadiAoHfQuantizer)
