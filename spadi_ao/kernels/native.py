"""Decode (a few float32 tokens) as a small C kernel for x86-64 CPUs with AVX-512 (``csrc/dictionary_decode.c``).

It reads the stored format as it is: a float32 dictionary and values, or the int8 ones with float32 row
scales that ``spadi_ao.integrations.torchao`` stores (one byte per element read, 1.5-1.9x faster cold).

Stock torch ops can multiply by the sparse codes fast only through the codes decompressed to a dense
``(out, k)`` matrix (``spadi_ao.kernels.cpu``), which reads ``out * k`` floats: at ``k / s = 2`` that is
twice the stored values, and for SmolLM2's gate/up projections at CR 0.3 more bytes than the dense layer.
This kernel reads the stored values and bitmask themselves. Measured per call on the 1536 x 445 layer
(CR 0.3), 2 threads, cold caches: 69 us against 110 us for the dense-codes GEMV (and 134 us for the
dense layer). :func:`dictionary_decode` runs both stages in one call, which also saves the Python and
dispatch cost of a second product (SmolLM2's 576-wide layers take 10-60 us each, so a few microseconds
per call show end to end); :func:`codes_gemv` is stage 2 alone, behind a quantised dictionary.

The kernel is compiled on first use with the system C compiler (``$CC``, else ``cc``) into
``$SPADI_AO_CACHE/kernels``, the way Triton and Inductor build theirs. Where that cannot work (not Linux
x86-64, no AVX-512, no compiler, or ``SPADI_AO_NATIVE_KERNELS=0``) :func:`available` is false and the
torch-ops route runs instead; a failed build says why in one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from spadi_ao.cache import cache_root

__all__ = [
    "SWITCH_ENV",
    "available",
    "unavailable_reason",
    "readable",
    "codes_gemv",
    "dictionary_decode",
]

SWITCH_ENV = "SPADI_AO_NATIVE_KERNELS"
SOURCE = Path(__file__).with_name("csrc") / "dictionary_decode.c"
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mpopcnt", "-fopenmp", "-shared", "-fPIC")


def unavailable_reason() -> Optional[str]:
    """Why the native kernel cannot run on this machine, or ``None`` when it can (before building it)."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return f"disabled by {SWITCH_ENV}=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64, not {sys.platform} on {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return f"needs AVX-512; this CPU offers {capability}"
    if _compiler() is None:
        return "no C compiler found (set $CC)"
    return None


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    """Compile once per source, flags and compiler; written under a temporary name, then renamed into place."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version]).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"dictionary_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True, check=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@dataclass(frozen=True)
class _Kernels:
    codes_gemv: ctypes._CFuncPtr
    dictionary_decode: ctypes._CFuncPtr


@functools.cache
def _kernels() -> Optional[_Kernels]:
    if unavailable_reason() is not None:
        return None
    try:
        library = ctypes.CDLL(str(_build(_compiler())))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"spadi_ao: the native CPU decode kernel could not be built ({detail}); using torch ops", stacklevel=3)
        return None
    pointer, int64, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # values, values_int8, value_scale, s, bitmask, bias, y, out, threads
    codes_tail = [pointer, flag, pointer, int64, pointer, pointer, pointer, int64, flag]
    library.spadi_codes_gemv.argtypes = [pointer, int64, int64, *codes_tail]  # z, tokens, k
    # x, tokens, in, dictionary, dictionary_int8, dictionary_scale, k
    library.spadi_dictionary_decode.argtypes = [pointer, int64, int64, pointer, flag, pointer, int64, *codes_tail]
    for function in (library.spadi_codes_gemv, library.spadi_dictionary_decode):
        function.restype = int64
    return _Kernels(library.spadi_codes_gemv, library.spadi_dictionary_decode)


def available() -> bool:
    """Whether the kernels can run here (builds them on the first call)."""
    return _kernels() is not None


def _refuse(invalid: int, out: int, s: int, k: int) -> None:
    if invalid < 0:
        raise MemoryError("the native decode kernel could not allocate its scratch")
    raise ValueError(f"bitmask: {invalid} of {out} rows do not set exactly s={s} bits below k={k}")


def readable(stored: torch.Tensor, scale: Optional[torch.Tensor]) -> bool:
    """Whether the kernels read a stored dictionary or value tensor as it is: float32 without a scale, or
    int8 with a float32 scale per row (``spadi_ao.integrations.torchao``)."""
    if scale is None:
        return stored.dtype == torch.float32
    return stored.dtype == torch.int8 and scale.dtype == torch.float32


# The wrappers below run once per layer and decoded token, so they avoid every tensor op they can (each
# costs ~0.5-2 us against kernels of 5-100 us): the output is allocated flat and viewed to shape. Callers
# check ``readable`` and pass contiguous tensors (``spadi_ao.kernels.cpu`` makes them so).


def codes_gemv(
    z: torch.Tensor, values: torch.Tensor, value_scale: Optional[torch.Tensor], bitmask: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``z @ C^T + bias`` for float32 ``z`` ``(..., k)`` and codes packed as ``values`` ``(out, s)`` + ``bitmask``.

    Call only when :func:`available`, on contiguous CPU tensors.
    """
    k = z.shape[-1]
    out, s = values.shape
    tokens = z.numel() // k
    y = z.new_empty(tokens * out)
    invalid = _kernels().codes_gemv(
        z.data_ptr(), tokens, k, values.data_ptr(), value_scale is not None,
        None if value_scale is None else value_scale.data_ptr(), s, bitmask.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), out, torch.get_num_threads(),
    )
    if invalid:
        _refuse(invalid, out, s, k)
    return y.view(*z.shape[:-1], out)


def dictionary_decode(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    dictionary_scale: Optional[torch.Tensor],
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``(x @ D~^T) @ C^T + bias`` in one call, for float32 ``x`` ``(..., in)`` and the stored format.

    Call only when :func:`available`, on contiguous CPU tensors.
    """
    k, in_features = dictionary.shape
    out, s = values.shape
    tokens = x.numel() // in_features
    y = x.new_empty(tokens * out)
    invalid = _kernels().dictionary_decode(
        x.data_ptr(), tokens, in_features, dictionary.data_ptr(), dictionary_scale is not None,
        None if dictionary_scale is None else dictionary_scale.data_ptr(), k, values.data_ptr(), value_scale is not None,
        None if value_scale is None else value_scale.data_ptr(), s, bitmask.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), out, torch.get_num_threads(),
    )
    if invalid:
        _refuse(invalid, out, s, k)
    return y.view(*x.shape[:-1], out)
