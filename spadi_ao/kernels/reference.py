"""Dequantisation helpers and the dense reference every kernel is tested against."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from spadi_ao.format import unpack_codes

__all__ = ["dequantize_dictionary", "dequantize_values", "reference_dictionary_linear"]


def dequantize_dictionary(
    dictionary: torch.Tensor, dictionary_scale: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """Float ``(k, in)`` dictionary; int8 rows are scaled by their per-atom ``dictionary_scale``."""
    if dictionary_scale is None:
        return dictionary.to(dtype)
    return (dictionary.to(torch.float32) * dictionary_scale.to(torch.float32).unsqueeze(1)).to(dtype)


def dequantize_values(values: torch.Tensor, value_scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Float ``(out, s)`` code values; int8 rows are scaled by their per-output ``value_scale``."""
    if value_scale is None:
        return values.to(dtype)
    return (values.to(torch.float32) * value_scale.to(torch.float32).unsqueeze(1)).to(dtype)


def reference_dictionary_linear(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    dictionary_scale: Optional[torch.Tensor],
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """Dense math on unpacked codes: the ground truth every kernel is tested against."""
    k = dictionary.shape[0]
    atoms = dequantize_dictionary(dictionary, dictionary_scale, x.dtype)
    codes = unpack_codes(dequantize_values(values, value_scale, x.dtype), bitmask, k)
    return F.linear(F.linear(x, atoms), codes, bias)
