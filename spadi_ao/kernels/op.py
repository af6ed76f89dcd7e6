"""``spadi_ao::dictionary_linear``: the one op every compressed layer calls.

It is a ``torch.library.triton_op``: on CUDA, ``torch.compile`` decomposes it into its Triton kernels
(``wrap_triton``) so Inductor schedules them itself; eager CUDA launches them directly. Every other
device goes through ``select_kernel`` to ``spadi_ao::dictionary_linear_torch``, an opaque custom op over
``spadi_ao.kernels.cpu`` (its code cache must stay out of traced graphs). Eager CPU calls skip that hop:
the CPU kernel is registered on the public op as well.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from spadi_ao.kernels import cpu
from spadi_ao.kernels.reference import dequantize_dictionary, dequantize_values, reference_dictionary_linear
from spadi_ao.kernels.selector import HAS_TRITON, select_kernel

if HAS_TRITON:
    from spadi_ao.kernels import triton_dictionary

__all__ = ["dictionary_linear", "reference_dictionary_linear", "dequantize_dictionary", "dequantize_values"]


@torch.library.custom_op("spadi_ao::dictionary_linear_torch", mutates_args=())
def _dictionary_linear_torch(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    dictionary_scale: Optional[torch.Tensor],
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    return cpu.dictionary_linear(x, dictionary, dictionary_scale, values, value_scale, bitmask, bias)


@_dictionary_linear_torch.register_fake
def _(x, dictionary, dictionary_scale, values, value_scale, bitmask, bias):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.triton_op("spadi_ao::dictionary_linear", mutates_args=())
def dictionary_linear(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    dictionary_scale: Optional[torch.Tensor],
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``y = (x @ D~^T) @ C^T + b`` from the packed format (see ``spadi_ao.format``), in ``x.dtype``.

    ``x`` is ``(..., in)``; the result is ``(..., out)``. This body is also the fake implementation.
    """
    kernel = select_kernel(x.device, x.dtype, math.prod(x.shape[:-1]))
    if kernel == "torch":
        return _dictionary_linear_torch(x, dictionary, dictionary_scale, values, value_scale, bitmask, bias)
    return triton_dictionary.dictionary_linear(x, dictionary, dictionary_scale, values, value_scale, bitmask, bias, kernel)


dictionary_linear.register_kernel("cpu")(cpu.dictionary_linear)
