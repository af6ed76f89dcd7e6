"""Triton kernels for ``y = (x @ D~^T) @ C^T + b`` straight from the packed format.

Two launches, each reading its part of the compressed weight exactly once:

1. **atoms**: ``z = x @ D~^T`` (M x k) with ``tl.dot``. An int8 dictionary is converted in registers
   (exact in every float type) and its per-atom scale is applied to the fp32 accumulator.
2. **codes**: ``y = z @ C^T + b``. Each program rebuilds its ``(BLOCK_N, BLOCK_K)`` tile of ``C`` in
   registers from the bitmask: bytes are expanded to bits, ``tl.cumsum`` along the row gives every set
   bit its rank, which (plus the count carried from earlier tiles) indexes the row of ``values``. int8
   values are scaled per output row on the accumulator.

Decode (M <= ``DECODE_MAX_TOKENS``) is a GEMV: stage 1 is split over the input dimension with fp32
atomic adds so that a few thousand atoms still occupy every SM, and all tokens share one 16-row tile.
Prefill tiles the tokens too and is compute-bound.

The kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (exact, slow), with two concessions to the
interpreter of Triton 3.9: it has no benchmarker for ``triton.autotune``, so each kernel keeps its first
(small) config; and it stores bf16 as raw uint16, so ``tl.dot`` on bf16 and int-to-bf16 casts give
garbage. There ``UPCAST`` rounds every operand to bf16 and holds it in fp32 for an fp32 ``tl.dot``:
the same exact products and fp32 accumulation as the bf16 MMA on a GPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

__all__ = ["dictionary_linear"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DECODE_BLOCK_M = 16  # the smallest tile tl.dot accepts; holds every decode token


def _configs(*configs: triton.Config) -> list[triton.Config]:
    return list(configs[:1] if _INTERPRET else configs)


@triton.jit
def _operand(v, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """``v`` rounded to the compute ``dtype`` (kept in fp32 under ``UPCAST``) for ``tl.dot``."""
    if UPCAST:
        return v.to(tl.float32).to(dtype).to(tl.float32)
    return v.to(dtype)


@triton.jit
def _codes_tile(
    bitmask_ptr, values_ptr, offs_n, rows, start, base, S, NB, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Dense ``C[offs_n, start:start + BLOCK_K]`` and the per-row count of set bits so far."""
    offs_byte = start // 8 + tl.arange(0, BLOCK_K // 8)
    byte = tl.load(
        bitmask_ptr + offs_n[:, None] * NB + offs_byte[None, :],
        mask=rows[:, None] & (offs_byte[None, :] < NB),
        other=0,
    ).to(tl.int32)
    bits = (byte[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    bits = tl.reshape(bits, (BLOCK_N, BLOCK_K))  # row-major: column 8 * byte + bit, as in the format
    rank = base[:, None] + tl.cumsum(bits, axis=1) - bits
    codes = tl.load(values_ptr + offs_n[:, None] * S + rank, mask=bits != 0, other=0)
    return codes, base + tl.sum(bits, axis=1)


@triton.jit
def _codes_kernel(
    z_ptr, bitmask_ptr, values_ptr, v_scale_ptr, bias_ptr, y_ptr,
    M, N, K, S, NB,
    HAS_V_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    out_dtype = y_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_n < N
    tokens = offs_m < M
    base = tl.zeros((BLOCK_N,), tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for start in range(0, K, BLOCK_K):
        codes, base = _codes_tile(bitmask_ptr, values_ptr, offs_n, rows, start, base, S, NB, BLOCK_N, BLOCK_K)
        offs_k = start + tl.arange(0, BLOCK_K)
        z = tl.load(
            z_ptr + offs_m[:, None] * K + offs_k[None, :], mask=tokens[:, None] & (offs_k[None, :] < K), other=0.0
        )
        # z is rounded to the output dtype first, as the two-GEMM reference does.
        acc += tl.dot(
            _operand(z, out_dtype, UPCAST), tl.trans(_operand(codes, out_dtype, UPCAST)), input_precision=PRECISION
        )
    if HAS_V_SCALE:
        acc *= tl.load(v_scale_ptr + offs_n, mask=rows, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=rows, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_dtype), mask=tokens[:, None] & rows[None, :])


_codes_decode_kernel = triton.autotune(
    configs=_configs(
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4),
        triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4),
        triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=2),
    ),
    key=["N", "K"],
)(_codes_kernel)

_codes_prefill_kernel = triton.autotune(
    configs=_configs(
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    ),
    key=["N", "K"],
)(_codes_kernel)


@triton.autotune(
    configs=_configs(
        triton.Config({"BLOCK_K": 32, "BLOCK_IN": 64}, num_warps=4),
        triton.Config({"BLOCK_K": 64, "BLOCK_IN": 256}, num_warps=4),
        triton.Config({"BLOCK_K": 32, "BLOCK_IN": 512}, num_warps=4),
        triton.Config({"BLOCK_K": 128, "BLOCK_IN": 128}, num_warps=4),
    ),
    key=["K", "IN"],
    reset_to_zero=["z_ptr"],
)
@triton.jit
def _atoms_split_kernel(
    x_ptr, d_ptr, d_scale_ptr, z_ptr,
    M, K, IN,
    HAS_D_SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_IN: tl.constexpr,
):  # fmt: skip
    """Decode stage 1: one ``(BLOCK_IN, BLOCK_K)`` slice of the dictionary per program, added into fp32 ``z``."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_in = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    x = tl.load(
        x_ptr + offs_m[:, None] * IN + offs_in[None, :], mask=(offs_m[:, None] < M) & (offs_in[None, :] < IN), other=0.0
    )
    d = tl.load(
        d_ptr + offs_k[None, :] * IN + offs_in[:, None], mask=(offs_k[None, :] < K) & (offs_in[:, None] < IN), other=0
    )
    acc = tl.dot(_operand(x, x.dtype, UPCAST), _operand(d, x.dtype, UPCAST), input_precision=PRECISION)
    if HAS_D_SCALE:
        acc *= tl.load(d_scale_ptr + offs_k, mask=offs_k < K, other=0.0)[None, :]
    tl.atomic_add(
        z_ptr + offs_m[:, None] * K + offs_k[None, :], acc, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K)
    )


@triton.autotune(
    configs=_configs(
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_IN": 32}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_IN": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64, "BLOCK_IN": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_IN": 64}, num_warps=4, num_stages=4),
    ),
    key=["K", "IN"],
)
@triton.jit
def _atoms_kernel(
    x_ptr, d_ptr, d_scale_ptr, z_ptr,
    M, K, IN,
    HAS_D_SCALE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_IN: tl.constexpr,
):  # fmt: skip
    """Prefill stage 1: a tiled GEMM writing ``z`` in the compute dtype."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for start in range(0, IN, BLOCK_IN):
        offs_in = start + tl.arange(0, BLOCK_IN)
        x = tl.load(
            x_ptr + offs_m[:, None] * IN + offs_in[None, :],
            mask=(offs_m[:, None] < M) & (offs_in[None, :] < IN),
            other=0.0,
        )
        d = tl.load(
            d_ptr + offs_k[None, :] * IN + offs_in[:, None],
            mask=(offs_k[None, :] < K) & (offs_in[:, None] < IN),
            other=0,
        )
        acc += tl.dot(_operand(x, x.dtype, UPCAST), _operand(d, x.dtype, UPCAST), input_precision=PRECISION)
    if HAS_D_SCALE:
        acc *= tl.load(d_scale_ptr + offs_k, mask=offs_k < K, other=0.0)[None, :]
    tl.store(
        z_ptr + offs_m[:, None] * K + offs_k[None, :],
        acc.to(z_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
    )


def dictionary_linear(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    dictionary_scale: Optional[torch.Tensor],
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    bias: Optional[torch.Tensor],
    kernel: str,
) -> torch.Tensor:
    """Run ``kernel`` (``"triton_decode"`` or ``"triton_prefill"``, see ``select_kernel``); output in ``x.dtype``."""
    k, in_features = dictionary.shape
    out_features, s = values.shape
    x2 = x.reshape(-1, in_features).contiguous()
    m = x2.shape[0]
    dictionary, values, bitmask = dictionary.contiguous(), values.contiguous(), bitmask.contiguous()
    y = x2.new_empty((m, out_features))
    if m == 0:
        return y.reshape(*x.shape[:-1], out_features)
    # Absent optional tensors still need a pointer; the HAS_* flags keep the kernels from reading it.
    d_scale = dictionary if dictionary_scale is None else dictionary_scale
    v_scale = values if value_scale is None else value_scale
    b = values if bias is None else bias
    upcast = _INTERPRET and x.dtype == torch.bfloat16
    # fp32 stays exact like F.linear, which does not use tf32 either; 16-bit inputs keep the backend default.
    precision = "ieee" if x.dtype == torch.float32 or upcast else None
    flags = dict(PRECISION=precision, UPCAST=upcast)
    codes_args = (bitmask, values, v_scale, b, y, m, out_features, k, s, bitmask.shape[1])
    codes_flags = dict(HAS_V_SCALE=value_scale is not None, HAS_BIAS=bias is not None, **flags)
    atoms_flags = dict(HAS_D_SCALE=dictionary_scale is not None, **flags)

    if kernel == "triton_decode":
        z = torch.zeros((m, k), dtype=torch.float32, device=x.device)
        decode_m_tiles = triton.cdiv(m, _DECODE_BLOCK_M)  # one tile unless the selector is bypassed
        wrap_triton(_atoms_split_kernel)[
            lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(in_features, meta["BLOCK_IN"]), decode_m_tiles)
        ](x2, dictionary, d_scale, z, m, k, in_features, BLOCK_M=_DECODE_BLOCK_M, **atoms_flags)
        wrap_triton(_codes_decode_kernel)[lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), decode_m_tiles)](
            z, *codes_args, BLOCK_M=_DECODE_BLOCK_M, **codes_flags
        )
    elif kernel == "triton_prefill":
        z = torch.empty((m, k), dtype=x.dtype, device=x.device)
        wrap_triton(_atoms_kernel)[lambda meta: (triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(m, meta["BLOCK_M"]))](
            x2, dictionary, d_scale, z, m, k, in_features, **atoms_flags
        )
        wrap_triton(_codes_prefill_kernel)[
            lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))
        ](z, *codes_args, **codes_flags)
    else:
        raise ValueError(f"unknown Triton kernel {kernel!r}; expected 'triton_decode' or 'triton_prefill'")
    return y.reshape(*x.shape[:-1], out_features)
