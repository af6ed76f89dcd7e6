"""CPU route for the dictionary linear (and the torch-ops route of any device without Triton).

Decode (at most ``selector.NATIVE_MAX_TOKENS`` tokens of float32, bfloat16 or float16) runs both stages in
the native C kernel (``spadi_ao.kernels.native``), which reads the packed codes themselves (16- or 32-bit
floats, or int8 with row scales) and needs no scratch beyond ``z``.

Everything else (prefill, evaluation, other dtypes, machines without that kernel) runs stage 1 as one BLAS
call, ``z = x @ D~^T``, and stage 2 block by block over the output rows: each block of the codes is
expanded from the packed form into a small dense tile (by the native kernel where it runs, else by torch
ops) and BLAS multiplies ``z`` by it straight into that block's columns of the output. The tile, at most
:data:`SCRATCH_BYTES` (or one row), is the only scratch and is freed before the call returns, so a layer
holds exactly its stored bytes between calls (a small layer's tile is all of its codes, for that call
only). A dense ``(out, k)`` copy of the codes kept per layer would cost ``out * k`` floats: twice the
values' bytes at ``k / s = 2``, more than the dense weight on SmolLM2's gate/up projections at CR 0.3,
and four times more again for int8 values. Expanding a tile reads only the stored bytes and costs little
next to the GEMM it feeds (``benchmarks/layer_latency.py``).

:func:`transposed_codes_product` and :func:`values_gradient` are the same blocks for the backward pass, in
plain torch ops so that ``torch.compile`` traces them.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from spadi_ao.format import unpack_mask
from spadi_ao.kernels import native
from spadi_ao.kernels.reference import dequantize_dictionary, dequantize_values
from spadi_ao.kernels.selector import select_kernel

__all__ = [
    "SCRATCH_BYTES",
    "dictionary_linear",
    "multiply_codes",
    "codes_product",
    "transposed_codes_product",
    "values_gradient",
    "code_rows",
    "row_blocks",
]

_CPU = torch.device("cpu")

# Bytes of one dense tile of the codes, the only scratch of a call: wide enough that each block is a GEMM BLAS
# runs near full speed (narrow blocks re-pack z for little work each), small next to any layer worth compressing.
SCRATCH_BYTES = 8 << 20


def row_blocks(out: int, k: int, dtype: torch.dtype) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` blocks of output rows whose ``(rows, k)`` tile in ``dtype`` fits :data:`SCRATCH_BYTES`."""
    rows = max(1, SCRATCH_BYTES // max(1, k * dtype.itemsize))
    for start in range(0, out, rows):
        yield start, min(start + rows, out)


def code_rows(
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    k: int,
    start: int,
    stop: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dense codes of output rows ``[start, stop)``, ``(stop - start, k)`` in ``dtype``, from torch ops
    (traceable); int8 values are dequantised per output row."""
    mask = unpack_mask(bitmask[start:stop], k)
    scale = None if value_scale is None else value_scale[start:stop]
    # masked_scatter fills the set bits in row-major order, i.e. in the increasing-atom order of ``values``.
    codes = torch.zeros(mask.shape, dtype=dtype, device=values.device)
    return codes.masked_scatter(mask, dequantize_values(values[start:stop], scale, dtype))


def _tile_plan(
    z: torch.Tensor,
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    k: int,
    plan: Optional[native.Plan],
):
    """The native plan that expands tiles for ``z``'s dtype, or ``None`` for the torch-ops tiles."""
    if not (z.is_cpu and z.dtype in native.ACTIVATION_DTYPES and native.available()):
        return None
    return plan if plan is not None and plan.k == k else native.codes_plan(values, value_scale, bitmask, k)


def _blocked_product(
    z: torch.Tensor,
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    bias: Optional[torch.Tensor],
    plan: Optional[native.Plan] = None,
) -> torch.Tensor:
    """``z @ C^T + b`` one tile of output rows at a time, written in place into the output (no autograd)."""
    k, out = z.shape[-1], values.shape[0]
    flat = z.reshape(-1, k)
    y = flat.new_empty((flat.shape[0], out))
    plan = _tile_plan(z, values, value_scale, bitmask, k, plan)
    buffer = None
    for start, stop in row_blocks(out, k, z.dtype):
        if plan is not None:
            if buffer is None:
                buffer = flat.new_empty((stop - start, k))
            tile = buffer[: stop - start]
            native.codes_tile(plan, start, stop, tile)
        else:
            tile = code_rows(values, value_scale, bitmask, k, start, stop, z.dtype)
        if bias is None:
            torch.mm(flat, tile.T, out=y[:, start:stop])
        else:
            torch.addmm(bias[start:stop], flat, tile.T, out=y[:, start:stop])
    return y.reshape(*z.shape[:-1], out)


def codes_product(
    z: torch.Tensor,
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``z @ C^T + b`` block by block in functional torch ops, for traced graphs and autograd."""
    k, out = z.shape[-1], values.shape[0]
    parts = [
        F.linear(
            z,
            code_rows(values, value_scale, bitmask, k, start, stop, z.dtype),
            None if bias is None else bias[start:stop],
        )
        for start, stop in row_blocks(out, k, z.dtype)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def transposed_codes_product(
    g: torch.Tensor, values: torch.Tensor, value_scale: Optional[torch.Tensor], bitmask: torch.Tensor, k: int
) -> torch.Tensor:
    """``g @ C`` (``(..., out)`` to ``(..., k)``): the gradient at ``z`` of ``z @ C^T``, block by block."""
    flat = g.reshape(-1, g.shape[-1])
    result = flat.new_zeros((flat.shape[0], k))
    for start, stop in row_blocks(values.shape[0], k, g.dtype):
        result = torch.addmm(
            result, flat[:, start:stop], code_rows(values, value_scale, bitmask, k, start, stop, g.dtype)
        )
    return result.reshape(*g.shape[:-1], k)


def values_gradient(g: torch.Tensor, z: torch.Tensor, bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """``g^T z`` read at the stored positions, ``(out * s,)`` in row-major value order, block by block
    (``g`` ``(tokens, out)``, ``z`` ``(tokens, k)``)."""
    parts = [
        (g[:, start:stop].T @ z).masked_select(unpack_mask(bitmask[start:stop], k))
        for start, stop in row_blocks(bitmask.shape[0], k, g.dtype)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _project(x: torch.Tensor, dictionary: torch.Tensor, dictionary_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``z = x @ D~^T``; per-atom int8 scales go on the ``(M, k)`` output instead of the ``(k, in)`` weight."""
    if dictionary_scale is None or x.dtype == torch.float16:  # fp16 could overflow before scaling
        return F.linear(x, dequantize_dictionary(dictionary, dictionary_scale, x.dtype))
    return F.linear(x, dictionary.to(x.dtype)) * dictionary_scale.to(x.dtype)


def _contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()  # the tensor itself when it already is


def _needs_grad(x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)
    )


def _native_decode(x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether ``select_kernel`` sends these ``x`` to the native kernel and no gradient has to flow through
    it (it has no autograd formula; the op's own wraps this module)."""
    if _needs_grad(x, values, bias):
        return False
    device = _CPU if x.is_cpu else x.device  # x.device builds a new object per call, a measurable cost here
    return select_kernel(device, x.dtype, x.numel() // max(x.shape[-1], 1)) == "native_decode"


class _CodesProduct(torch.autograd.Function):
    """``z @ C^T + b`` with gradients, for callers outside the op (a torchao-quantised dictionary): both
    passes run one tile of the codes at a time and only ``z`` and the stored tensors are saved, so no dense
    copy of the codes lives until the backward pass."""

    @staticmethod
    def forward(ctx, z, values, value_scale, bitmask, bias):
        ctx.save_for_backward(z, values, value_scale, bitmask)
        ctx.has_bias = bias is not None
        return _blocked_product(z, values, value_scale, bitmask, bias)

    @staticmethod
    def backward(ctx, grad_output):
        z, values, value_scale, bitmask = ctx.saved_tensors
        k = z.shape[-1]
        grad_z = (
            transposed_codes_product(grad_output, values, value_scale, bitmask, k) if ctx.needs_input_grad[0] else None
        )
        grad_values = grad_bias = None
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[1] and value_scale is None:
            grad_values = values_gradient(flat_grad, z.reshape(-1, k), bitmask, k).view_as(values).to(values.dtype)
        if ctx.needs_input_grad[4] and ctx.has_bias:
            grad_bias = flat_grad.sum(0)
        return grad_z, grad_values, None, None, grad_bias


def multiply_codes(
    z: torch.Tensor,
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``z @ C^T + b``: the native kernel on the packed codes for decode, else tile by tile (with a tiled
    backward pass when a gradient flows)."""
    if _needs_grad(z, values, bias):
        return _CodesProduct.apply(z, values, value_scale, bitmask, bias)
    plan = None
    if _native_decode(z, values, bias):
        k = z.shape[-1]
        plan = native.codes_plan(values, value_scale, bitmask, k) or native.codes_plan(
            *map(_contiguous, (values, value_scale, bitmask)), k
        )
        y = None if plan is None else native.codes_gemv(plan, z.contiguous(), _contiguous(bias))
        if y is not None:
            return y
    return _blocked_product(z, values, value_scale, bitmask, bias, plan)


def dictionary_linear(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    dictionary_scale: Optional[torch.Tensor],
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``y = (x @ D~^T) @ C^T + b``: both stages in the native kernel for decode, else BLAS for the
    first product and :func:`multiply_codes` for the second."""
    plan = None
    if _native_decode(x, values, bias):
        stored = (dictionary, dictionary_scale, values, value_scale, bitmask)
        plan = native.dictionary_plan(*stored) or native.dictionary_plan(*map(_contiguous, stored))
        y = None if plan is None else native.dictionary_decode(plan, x.contiguous(), _contiguous(bias))
        if y is not None:
            return y
    elif x.is_cpu and x.dtype in native.ACTIVATION_DTYPES and native.available():
        plan = native.dictionary_plan(dictionary, dictionary_scale, values, value_scale, bitmask)
    z = _project(x, dictionary, dictionary_scale)
    return _blocked_product(z, values, value_scale, bitmask, bias, plan)
