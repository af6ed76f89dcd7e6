"""``spadi_ao::dictionary_linear``: the one op every compressed layer calls.

It is a ``torch.library.triton_op``: on CUDA, ``torch.compile`` decomposes it into its Triton kernels
(``wrap_triton``) so Inductor schedules them itself; eager CUDA launches them directly. Every other
device goes through ``select_kernel`` to ``spadi_ao::dictionary_linear_torch``, an opaque op over
``spadi_ao.kernels.cpu`` (its native kernels and in-place tile products must stay out of traced graphs).
Eager CPU calls skip that hop: the CPU kernel is registered on the public op as well.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from spadi_ao.kernels import cpu
from spadi_ao.kernels.reference import dequantize_dictionary, dequantize_values, reference_dictionary_linear
from spadi_ao.kernels.selector import HAS_TRITON, select_kernel

if HAS_TRITON:
    from spadi_ao.kernels import triton_dictionary

__all__ = ["dictionary_linear", "reference_dictionary_linear", "dequantize_dictionary", "dequantize_values"]


# A plain ``torch.library`` definition rather than ``custom_op``: compiled CPU graphs call it once per Linear
# and decoded token, and custom_op's Python wrapper is a visible share of a small layer's call.
# It only ever runs below the public op, whose autograd formula covers it.
_LIBRARY = torch.library.Library("spadi_ao", "FRAGMENT")
_LIBRARY.define(
    "dictionary_linear_torch(Tensor x, Tensor dictionary, Tensor? dictionary_scale, Tensor values, "
    "Tensor? value_scale, Tensor bitmask, Tensor? bias) -> Tensor"
)
_LIBRARY.impl("dictionary_linear_torch", cpu.dictionary_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("spadi_ao::dictionary_linear_torch")
def _(x, dictionary, dictionary_scale, values, value_scale, bitmask, bias):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


_dictionary_linear_torch = torch.ops.spadi_ao.dictionary_linear_torch.default


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
    if not kernel.startswith("triton"):
        return _dictionary_linear_torch(x, dictionary, dictionary_scale, values, value_scale, bitmask, bias)
    return triton_dictionary.dictionary_linear(
        x, dictionary, dictionary_scale, values, value_scale, bitmask, bias, kernel
    )


dictionary_linear.register_kernel("cpu")(cpu.dictionary_linear)


def _setup_context(ctx, inputs, output) -> None:
    x, dictionary, dictionary_scale, values, value_scale, bitmask, bias = inputs
    ctx.save_for_backward(x, dictionary, dictionary_scale, values, value_scale, bitmask)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_output: torch.Tensor):
    """Gradients for ``x`` (fine-tuning around compressed layers, e.g. LoRA) and for the float tensors.

    Plain torch ops, traceable by ``torch.compile``, over one small tile of the codes at a time (as the
    forward pass): ``dL/dx = (g C^T) D~``; the dictionary's gradient is ``(g C^T)^T x``, the values' is
    ``g^T z`` read at the stored positions. Quantised (int8) tensors and the bitmask get none.
    """
    x, dictionary, dictionary_scale, values, value_scale, bitmask = ctx.saved_tensors
    needs_x, needs_dictionary, _, needs_values, _, _, needs_bias = ctx.needs_input_grad
    k = dictionary.shape[0]
    grad_atoms = cpu.transposed_codes_product(
        grad_output, values, value_scale, bitmask, k
    )  # the gradient at z = x D~^T
    atoms = dequantize_dictionary(dictionary, dictionary_scale, grad_output.dtype)
    grad_x = grad_atoms @ atoms if needs_x else None
    grad_dictionary = grad_values = grad_bias = None
    flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
    if needs_dictionary and dictionary_scale is None:
        grad_dictionary = (grad_atoms.reshape(-1, k).T @ x.reshape(-1, x.shape[-1]).to(grad_output.dtype)).to(
            dictionary.dtype
        )
    if needs_values and value_scale is None:
        projected = F.linear(x.to(grad_output.dtype), atoms).reshape(-1, k)
        grad_values = cpu.values_gradient(flat_grad, projected, bitmask, k).view_as(values).to(values.dtype)
    if needs_bias and ctx.bias_dtype is not None:
        grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_dictionary, None, grad_values, None, None, grad_bias


dictionary_linear.register_autograd(_backward, setup_context=_setup_context)
