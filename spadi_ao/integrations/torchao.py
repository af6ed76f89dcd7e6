"""torchao quantisation of compressed weights: the dictionary through a torchao config, the code values as bf16/int8.

The byte budget sizes ``k`` and ``s`` in the weight dtype; quantising the parts afterwards shrinks the stored
bytes again without touching the solve. Two routes for the dictionary ``D~`` (k x in):

* ``Int8WeightOnlyConfig`` with per-row granularity (its default) stores our own int8 ``dictionary`` and a
  per-atom float32 ``dictionary_scale`` (torchao's ``choose_qparams_affine`` / ``quantize_affine``, exactly as
  its ``Int8Tensor``), which ``spadi_ao::dictionary_linear`` consumes with fused dequantisation;
* every other supported config runs torchao's own handler on a Linear holding ``D~``: ``dictionary`` becomes
  torchao's quantised tensor and the first GEMM ``x D~^T`` runs on torchao's kernels.

Code values: ``"bfloat16"`` casts them, ``"int8"`` is symmetric per output row with a float32 ``value_scale``.

Composition with ``torchao.quantization.quantize_``, in both orders:

* compress, then quantise: ``quantize_(model, Int8WeightOnlyConfig())`` on a compressed model quantises the
  dictionaries (``IntxWeightOnlyConfig`` for int4, ``Int8DynamicActivationInt8WeightConfig``); any other
  config leaves a compressed weight unchanged with a warning, never densified. Compressing with
  ``DictionaryConfig(dictionary_quantization=...)`` reaches the same tensors through the public config
  alone;
* quantise, then compress: refused with a clear error (the weight is already quantised: compress first).

torchao 0.18 dispatches ``quantize_`` on the config type alone and offers no public hook for the weight's
type, so importing this module puts one wrapper where ``quantize_`` looks handlers up (see
:class:`CompressedAwareHandlers`): torchao's table itself is untouched, and handlers registered at any time,
before or after ``import spadi_ao``, are covered.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator, Mapping
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils.weak import WeakIdKeyDictionary
from torchao.core.config import AOBaseConfig
from torchao.quantization import (
    Int8WeightOnlyConfig,
    MappingType,
    PerGroup,
    PerRow,
    quant_api,
    quantize_,
)
from torchao.quantization.quant_primitives import choose_qparams_affine, quantize_affine
from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

from spadi_ao.configs import (
    DICTIONARY_CONFIGS,
    VALUES_DTYPES,
    DictionaryConfig,
    LowRankConfig,
    check_dictionary_quantization,
    check_values_dtype,
)
from spadi_ao.grouping import relink_shared
from spadi_ao.tensor import DictionaryTensor, is_compressed_weight

__all__ = [
    "DICTIONARY_CONFIGS",
    "VALUES_DTYPES",
    "check_dictionary_quantization",
    "check_values_dtype",
    "int8_rows",
    "is_quantized_dictionary",
    "quantize_dictionary",
    "quantize_dictionary_",
]

_INT8_MIN, _INT8_MAX = torch.iinfo(torch.int8).min, torch.iinfo(torch.int8).max


def int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row, computed as torchao's ``Int8Tensor.from_hp`` does."""
    block_size = (1, rows.shape[1])
    scale, zero_point = choose_qparams_affine(
        rows,
        MappingType.SYMMETRIC,
        block_size,
        torch.int8,
        _INT8_MIN,
        _INT8_MAX,
        eps=torch.finfo(torch.float32).eps,
        scale_dtype=torch.float32,
        zero_point_dtype=torch.int8,
    )
    return quantize_affine(rows, block_size, scale, zero_point, torch.int8, _INT8_MIN, _INT8_MAX), scale


def is_quantized_dictionary(weight: DictionaryTensor) -> bool:
    return weight.dictionary_scale is not None or is_traceable_wrapper_subclass(weight.dictionary)


def _check_groups(config: AOBaseConfig, in_features: int) -> None:
    granularity = getattr(config, "granularity", None)
    if isinstance(granularity, PerGroup) and in_features % granularity.group_size:
        raise ValueError(
            f"dictionary_quantization {type(config).__name__} group_size={granularity.group_size} must divide "
            f"the layer's in_features={in_features}"
        )


def _quantize_atoms(dictionary: torch.Tensor, config: AOBaseConfig) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(config, Int8WeightOnlyConfig) and isinstance(config.granularity, PerRow):
        return int8_rows(dictionary)
    _check_groups(config, dictionary.shape[1])
    holder = nn.Linear(dictionary.shape[1], dictionary.shape[0], bias=False, device="meta")
    holder.weight = nn.Parameter(dictionary, requires_grad=False)
    quantize_(holder, config)
    return holder.weight.detach(), None


# float dictionary -> (config, its quantised form): layers sharing one dictionary (spadi_ao.grouping) are
# quantised one at a time (quantize_ calls the handler per Linear) and must keep sharing its quantised bytes.
_quantized_atoms: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _shared_quantize_atoms(
    dictionary: torch.Tensor, config: AOBaseConfig
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    cached = _quantized_atoms.get(dictionary)
    if cached is None or cached[0] is not config:
        cached = _quantized_atoms[dictionary] = (config, *_quantize_atoms(dictionary, config))
    return cached[1], cached[2]


def _quantize_values(
    values: torch.Tensor, value_scale: Optional[torch.Tensor], values_dtype: str
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if value_scale is not None:
        raise ValueError(f"the code values are already int8; values_dtype={values_dtype!r} cannot re-quantise them")
    if values_dtype == "int8":
        return int8_rows(values)
    return values.to(torch.bfloat16), None


def quantize_dictionary(
    weight: DictionaryTensor, dictionary_quantization: Optional[AOBaseConfig] = None, values_dtype: Optional[str] = None
) -> DictionaryTensor:
    """A new ``DictionaryTensor`` with its dictionary quantised by a torchao config and/or its values re-typed.

    ``None`` leaves that part as it is; a part that is already quantised raises ``ValueError``.
    """
    check_dictionary_quantization(dictionary_quantization)
    check_values_dtype(values_dtype)
    dictionary, dictionary_scale = weight.dictionary, weight.dictionary_scale
    if dictionary_quantization is not None:
        if is_quantized_dictionary(weight):
            raise ValueError("the dictionary is already quantised; quantise a float dictionary")
        dictionary, dictionary_scale = _shared_quantize_atoms(dictionary, dictionary_quantization)
    values, value_scale = weight.values, weight.value_scale
    if values_dtype is not None:
        values, value_scale = _quantize_values(values, value_scale, values_dtype)
    return DictionaryTensor(dictionary, values, weight.bitmask, weight.dtype, dictionary_scale, value_scale)


def quantize_dictionary_(
    model: nn.Module,
    dictionary_quantization: Optional[AOBaseConfig] = None,
    values_dtype: Optional[str] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
) -> int:
    """Quantise the dictionaries and/or code values of an already compressed model in place.

    The same transform as ``DictionaryConfig(dictionary_quantization=..., values_dtype=...)`` applies after the
    solve, so one compression can be re-used for several precisions. Every layer is quantised before any weight
    is swapped, so an error leaves the model as it was. Returns the number of layers changed.
    """
    check_dictionary_quantization(dictionary_quantization)
    check_values_dtype(values_dtype)
    if dictionary_quantization is None and values_dtype is None:
        raise ValueError("pass dictionary_quantization (a torchao config) and/or values_dtype ('bfloat16' or 'int8')")
    targets = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and isinstance(module.weight, DictionaryTensor)
        and (filter_fn is None or filter_fn(module, name))
    }
    if not targets:
        raise ValueError(
            "no Linear with a DictionaryTensor weight matched: compress the model with sparsify_dictionary_ first"
        )
    new_weights = {}
    for name, module in targets.items():
        try:
            new_weights[name] = quantize_dictionary(module.weight, dictionary_quantization, values_dtype)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    for name, weight in new_weights.items():
        targets[name].weight = nn.Parameter(weight, requires_grad=False)
    relink_shared(module.weight for module in targets.values())
    return len(new_weights)


def _unchanged_reason(weight: torch.Tensor, config: AOBaseConfig) -> Optional[str]:
    if not isinstance(weight, DictionaryTensor):
        return f"quantize_ does not quantise {type(weight).__name__} factors"
    if not isinstance(config, DICTIONARY_CONFIGS):
        allowed = ", ".join(cls.__name__ for cls in DICTIONARY_CONFIGS)
        return f"{type(config).__name__} is not supported for a dictionary (supported: {allowed})"
    if is_quantized_dictionary(weight):
        return "its dictionary is already quantised"
    return None


def _is_compression_config(config_type: type) -> bool:
    return issubclass(config_type, (DictionaryConfig, LowRankConfig))


@functools.cache
def _compressed_weight_aware(handler: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """torchao's handler for dense weights; compressed weights get their dictionary quantised, or a warning."""

    @functools.wraps(handler)
    def handle(module: nn.Module, config: AOBaseConfig, *args, **kwargs) -> nn.Module:
        name = kwargs.get("parameter_name", "weight")
        weight = getattr(module, name, None)
        if not is_compressed_weight(weight):
            return handler(module, config, *args, **kwargs)
        reason = _unchanged_reason(weight, config)
        if reason is not None:
            warnings.warn(f"quantize_ left a compressed {tuple(weight.shape)} weight unchanged: {reason}", stacklevel=3)
            return module
        setattr(module, name, nn.Parameter(quantize_dictionary(weight, config), requires_grad=False))
        return module

    return handle


class CompressedAwareHandlers(Mapping):
    """torchao's handler table as ``quantize_`` reads it: every lookup wraps the registered handler (see
    ``_compressed_weight_aware``), except for spadi_ao's own configs, whose handlers refuse compressed weights.

    It reads the live table at each lookup, so a handler registered after ``import spadi_ao``, or registered
    again, composes as well; registrations through this view land in the table.
    """

    def __init__(self, table: dict) -> None:
        self.table = table

    def __getitem__(self, config_type: type) -> Callable[..., nn.Module]:
        handler = self.table[config_type]
        return handler if _is_compression_config(config_type) else _compressed_weight_aware(handler)

    def __setitem__(self, config_type: type, handler: Callable[..., nn.Module]) -> None:
        self.table[config_type] = handler

    def __iter__(self) -> Iterator[type]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)


def _install_lookup_wrapper() -> None:
    """``quantize_`` (and ``FqnToConfig``) look handlers up in ``quant_api``'s name for the table: that name,
    and only it, becomes the view; importing this module again leaves it as it is."""
    if not isinstance(quant_api._QUANTIZE_CONFIG_HANDLER, CompressedAwareHandlers):
        quant_api._QUANTIZE_CONFIG_HANDLER = CompressedAwareHandlers(_QUANTIZE_CONFIG_HANDLER)


_install_lookup_wrapper()
