"""The one place that decides which implementation runs ``spadi_ao::dictionary_linear``.

:func:`select_kernel` picks the kernel from device, dtype and token count. Eager CPU inference may skip the
op's dispatch altogether: :func:`eager_cpu_route` and :func:`eager_native_decode` decide when, because every
Linear of every decoded token pays that dispatch (``benchmarks/decode.py`` measures it).
"""

from __future__ import annotations

import importlib.util
from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from spadi_ao.kernels import native

__all__ = [
    "DECODE_MAX_TOKENS",
    "NATIVE_MAX_TOKENS",
    "HAS_TRITON",
    "select_kernel",
    "eager_cpu_route",
    "eager_native_decode",
]

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


def _traced() -> bool:
    """Compiling, tracing, a fake-tensor or other dispatch mode, or CPU autocast: the op must run."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or torch.is_autocast_enabled("cpu")


def eager_cpu_route(x: torch.Tensor, tensors: Iterable[Optional[torch.Tensor]]) -> bool:
    """Whether a call may run the CPU route (``spadi_ao.kernels.cpu``) without the op's dispatch: eager, on
    the CPU, and no gradient to flow through ``tensors`` (the op's autograd formula would be skipped)."""
    if type(x) is not torch.Tensor or not x.is_cpu or _traced():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def eager_native_decode(x: torch.Tensor) -> bool:
    """Whether an inference call goes straight to the native decode kernel: what :func:`eager_cpu_route` and
    :func:`select_kernel` would decide, checked cheapest first (the kernel still refuses what it cannot read)."""
    if torch.is_grad_enabled() or type(x) is not torch.Tensor or not x.is_cpu or x.dim() == 0:
        return False
    return x.numel() <= NATIVE_MAX_TOKENS * x.shape[-1] and not _traced()
