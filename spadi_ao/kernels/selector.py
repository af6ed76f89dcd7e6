"""The one place that decides which implementation runs ``spadi_ao::dictionary_linear``."""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["DECODE_MAX_TOKENS", "HAS_TRITON", "select_kernel"]

HAS_TRITON = importlib.util.find_spec("triton") is not None

# At or below this many tokens the layer is bound by reading the weight, not by arithmetic.
DECODE_MAX_TOKENS = 16

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def select_kernel(device: torch.device, dtype: torch.dtype, tokens: int) -> str:
    """``"triton_decode"``, ``"triton_prefill"`` or ``"torch"`` for ``tokens`` rows of ``x``.

    Triton needs a CUDA (or ROCm) device; everything else takes the torch-ops route
    (``spadi_ao.kernels.cpu``), which also serves CUDA when Triton is missing.
    """
    if device.type == "cuda" and HAS_TRITON and dtype in _TRITON_DTYPES:
        return "triton_decode" if tokens <= DECODE_MAX_TOKENS else "triton_prefill"
    return "torch"
