"""The one place that decides which implementation runs ``spadi_ao::dictionary_linear``."""

from __future__ import annotations

import importlib.util

import torch

from spadi_ao.kernels import native

__all__ = ["DECODE_MAX_TOKENS", "NATIVE_MAX_TOKENS", "HAS_TRITON", "select_kernel"]

HAS_TRITON = importlib.util.find_spec("triton") is not None

# At or below this many tokens the layer is bound by reading the weight, not by arithmetic.
DECODE_MAX_TOKENS = 16

# The native CPU kernel re-expands the codes for every 4 tokens, so it wins while the weights' bytes, not
# arithmetic, bound the layer; past a few tokens a BLAS GEMM against expanded tiles of the codes wins
# (the crossover is measured in benchmarks/layer_latency.py and docs/kernels.md).
NATIVE_MAX_TOKENS = 8

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def select_kernel(device: torch.device, dtype: torch.dtype, tokens: int) -> str:
    """``"triton_decode"``, ``"triton_prefill"``, ``"native_decode"`` or ``"torch"`` for ``tokens`` rows of ``x``.

    Triton needs a CUDA (or ROCm) device. On the CPU, float32 / bfloat16 / float16 decode runs the packed codes
    through the native kernel (``spadi_ao.kernels.native``) where it is available; everything else takes the torch-ops
    route (``spadi_ao.kernels.cpu``), which also serves CUDA when Triton is missing.
    """
    kind = device.type
    if kind == "cuda" and HAS_TRITON and dtype in _TRITON_DTYPES:
        return "triton_decode" if tokens <= DECODE_MAX_TOKENS else "triton_prefill"
    if kind == "cpu" and dtype in native.ACTIVATION_DTYPES and tokens <= NATIVE_MAX_TOKENS and native.available():
        return "native_decode"
    return "torch"
