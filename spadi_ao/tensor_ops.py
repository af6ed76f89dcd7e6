"""Tensor behaviour of the compressed weights beyond the product: dtype casts, slices, copies, empty copies.

These are what transformers, ``nn.Module`` and vLLM's tensor-parallel loader call on a weight, and what
torchao's own tensors implement: ``.to(dtype)`` / ``.half()`` convert the parts held in the weight's dtype
(the dictionary and float values) and keep the bitmask, int8 or bfloat16-stored parts and scales as stored; row slices
keep the dictionary and slice the values and bitmask, column slices slice the dictionary, so a slice
is a view whose ``copy_`` writes into the weight it was taken from (vLLM's ``param.data.narrow(...)
.copy_(loaded.narrow(...))``).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass, return_and_correct_aliasing

from spadi_ao.tensor import DictionaryTensor, LowRankTensor, is_compressed_weight

__all__ = ["inner_tensors", "describe_linears"]

aten = torch.ops.aten


def inner_tensors(tensor: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """The plain tensors a (possibly nested subclass) tensor holds."""
    if tensor is None:
        return []
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [leaf for name in names for leaf in inner_tensors(getattr(tensor, name))]
    return [tensor]


def _cast(
    tensor: Optional[torch.Tensor],
    dtype: Optional[torch.dtype],
    device: Any,
    weight_dtype: Optional[torch.dtype] = None,
) -> Optional[torch.Tensor]:
    """A stored part on ``device`` (None: where it is), in ``dtype`` if it is held in the weight's own dtype
    ``weight_dtype``; parts stored in a format of their own (int8 with scales, bfloat16 values of a float32
    weight, a bitmask, a torchao-quantised dictionary) stay as they are."""
    if tensor is None:
        return None
    floating = dtype is not None and type(tensor) is torch.Tensor and tensor.dtype == weight_dtype
    if device is None and not floating:
        return tensor
    return tensor.to(device=device or tensor.device, dtype=dtype if floating else tensor.dtype)


def _converted(weight: torch.Tensor, dtype: torch.dtype, device: Any) -> torch.Tensor:
    if torch.device(device) == weight.device:
        device = None  # parts stay where they are (a group's shared dictionary may still be a meta placeholder)
    if isinstance(weight, LowRankTensor):
        return LowRankTensor(
            _cast(weight.down, dtype, device, weight.dtype), _cast(weight.up, dtype, device, weight.dtype), dtype
        )
    scales = {name: _cast(getattr(weight, name), None, device) for name in weight.optional_tensor_data_names}
    return DictionaryTensor(
        _cast(weight.dictionary, dtype, device, weight.dtype),
        _cast(weight.values, dtype, device, weight.dtype),
        _cast(weight.bitmask, None, device),
        dtype,
        **scales,
    )


def _to_kwargs(weight: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.dtype, Any]:
    kwargs = weight._get_to_kwargs(*args, **kwargs)
    return kwargs["dtype"], kwargs["device"]


for _cls in (DictionaryTensor, LowRankTensor):

    @_cls.implements([aten._to_copy.default, aten.to.dtype_layout])
    def _(func, types, args, kwargs):
        weight = args[0]
        dtype, device = _to_kwargs(weight, args[1:], dict(kwargs))
        if not (dtype.is_floating_point and dtype.itemsize >= 2):
            raise ValueError(f"a {type(weight).__name__} computes in a 16- or 32-bit float dtype, not {dtype}")
        if func is aten.to.dtype_layout and dtype == weight.dtype and torch.device(device) == weight.device:
            return weight
        return return_and_correct_aliasing(func, args, kwargs, _converted(weight, dtype, device))

    @_cls.implements(aten.empty_like.default)
    def _(func, types, args, kwargs):
        """``module.to_empty(device=...)``: the same stored layout, uninitialised, on the new device."""
        weight, kwargs = args[0], dict(kwargs)
        device = kwargs.pop("device", None) or weight.device
        return weight._apply_fn_to_data(lambda part: torch.empty_like(part, device=device))


def _bounds(size: int, start: Optional[int], end: Optional[int]) -> tuple[int, int]:
    """Python slice bounds clamped to ``[0, size]``, as ``aten.slice`` treats them."""
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    start = min(max(start, 0), size)
    return start, min(max(end, start), size)


def _slice_dictionary(weight: DictionaryTensor, dim: int, start: int, end: int) -> DictionaryTensor:
    rows = slice(start, end)
    scale = weight.value_scale
    if dim == 0:  # outputs: their codes; every row keeps the whole dictionary
        return DictionaryTensor(
            weight.dictionary,
            weight.values[rows],
            weight.bitmask[rows],
            weight.dtype,
            dictionary_scale=weight.dictionary_scale,
            value_scale=None if scale is None else scale[rows],
        )
    dictionary = aten.slice.Tensor(weight.dictionary, 1, start, end)  # inputs: the atoms' columns
    return DictionaryTensor(
        dictionary,
        weight.values,
        weight.bitmask,
        weight.dtype,
        dictionary_scale=weight.dictionary_scale,
        value_scale=scale,
    )


def _slice_low_rank(weight: LowRankTensor, dim: int, start: int, end: int) -> LowRankTensor:
    if dim == 0:
        return LowRankTensor(weight.down, weight.up[start:end], weight.dtype)
    return LowRankTensor(weight.down[:, start:end], weight.up, weight.dtype)


for _cls, _slicer in ((DictionaryTensor, _slice_dictionary), (LowRankTensor, _slice_low_rank)):

    @_cls.implements(aten.slice.Tensor)
    def _(func, types, args, kwargs, _slicer=_slicer):
        weight, dim, start, end, step = (list(args) + [0, None, None, 1][len(args) - 1 :])[:5]
        dim = dim + 2 if dim < 0 else dim
        if step != 1 or dim not in (0, 1):
            raise NotImplementedError(
                f"{type(weight).__name__} slices rows or columns with step 1, got dim={dim}, step={step}"
            )
        start, end = _bounds(weight.shape[dim], start, end)
        if (start, end) == (0, weight.shape[dim]):
            return return_and_correct_aliasing(func, args, kwargs, weight._apply_fn_to_data(lambda part: part))
        return return_and_correct_aliasing(func, args, kwargs, _slicer(weight, dim, start, end))


def _weight_summary(weight: torch.Tensor) -> str:
    return repr(weight) if is_compressed_weight(weight) else f"{type(weight).__name__}({weight.dtype})"


def _linear_extra_repr(self: nn.Linear) -> str:
    return (
        f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, "
        f"weight={_weight_summary(self.weight)}"
    )


def describe_linears(model: nn.Module) -> None:
    """``print(model)`` shows each compressed Linear's weight (shape, k, s, dtypes, bytes), as torchao's
    ``quantize_`` makes it show its quantised weights."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and is_compressed_weight(module.weight):
            module.extra_repr = functools.partial(_linear_extra_repr, module)  # unlike a bound method, pickles
