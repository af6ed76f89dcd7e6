"""Decode (a few tokens) as a small C kernel for x86-64 CPUs with AVX-512 (``csrc/dictionary_decode.c``).

It reads the stored format as it is: a float32, bfloat16 or float16 dictionary and values, or the int8 ones
with float32 row scales that ``spadi_ao.integrations.torchao`` stores (one byte per element read).
Activations are float32, bfloat16 or float16; products accumulate in float32.

Stock torch ops can multiply by the sparse codes fast only through the codes decompressed to a dense
``(out, k)`` matrix (``spadi_ao.kernels.cpu``), which reads ``out * k`` floats: at ``k / s = 2`` that is
twice the stored values, and for SmolLM2's gate/up projections at CR 0.3 more bytes than the dense layer.
This kernel reads the stored values and bitmask themselves, so decode reads exactly the stored bytes
(latencies: ``docs/kernels.md``). :func:`dictionary_decode` runs both stages in one call, which also saves
the Python and dispatch cost of a second product, a visible share of a small layer's time;
:func:`codes_gemv` is stage 2 alone, behind a quantised dictionary.
For prefill, :func:`codes_tile` expands a block of output rows of the codes into a small dense tile that
BLAS multiplies (``spadi_ao.kernels.cpu``).

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
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from spadi_ao.cache import cache_root

__all__ = [
    "SWITCH_ENV",
    "Plan",
    "available",
    "unavailable_reason",
    "readable",
    "ACTIVATION_DTYPES",
    "dictionary_plan",
    "codes_plan",
    "dictionary_decode",
    "codes_gemv",
    "codes_tile",
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


class _StoredWeight(ctypes.Structure):
    """``spadi_weight`` in ``csrc/dictionary_decode.c``."""

    _fields_ = [
        ("dictionary", ctypes.c_void_p),
        ("dictionary_scale", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("value_scale", ctypes.c_void_p),
        ("bitmask", ctypes.c_void_p),
        ("dictionary_type", ctypes.c_int64),
        ("values_type", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("s", ctypes.c_int64),
        ("out", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class _Kernels:
    codes_gemv: ctypes._CFuncPtr
    dictionary_decode: ctypes._CFuncPtr
    codes_tile: ctypes._CFuncPtr


@functools.cache
def _kernels() -> Optional[_Kernels]:
    if unavailable_reason() is not None:
        return None
    try:
        library = ctypes.CDLL(str(_build(_compiler())))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(
            f"spadi_ao: the native CPU decode kernel could not be built ({detail}); using torch ops", stacklevel=3
        )
        return None
    pointer = ctypes.c_void_p
    for function in (library.spadi_codes_gemv, library.spadi_dictionary_decode):
        # weight, x or z, tokens, bias, y, activation type, threads
        function.argtypes = [pointer, pointer, ctypes.c_int64, pointer, pointer, ctypes.c_int64, ctypes.c_int]
        function.restype = ctypes.c_int64
    # weight, first row, end row, tile, tile type, threads
    library.spadi_codes_tile.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64, pointer, ctypes.c_int64, ctypes.c_int]
    library.spadi_codes_tile.restype = ctypes.c_int64
    return _Kernels(library.spadi_codes_gemv, library.spadi_dictionary_decode, library.spadi_codes_tile)


def available() -> bool:
    """Whether the kernels can run here (builds them on the first call)."""
    return _kernels() is not None


# Element type codes of ``csrc/dictionary_decode.c``. Activations (x, bias, output) are float32, bfloat16 or
# float16; the stored dictionary and values any of those, or int8 with a float32 scale per row.
_ACTIVATION_TYPES = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 3}
_ELEMENT_TYPES = {**_ACTIVATION_TYPES, torch.int8: 1}
ACTIVATION_DTYPES = tuple(_ACTIVATION_TYPES)


def readable(stored: torch.Tensor, scale: Optional[torch.Tensor]) -> bool:
    """Whether the kernels read a stored dictionary or value tensor as it is: float32, bfloat16 or float16
    without a scale, or int8 with a float32 scale per row (``spadi_ao.integrations.torchao``)."""
    if scale is None:
        return stored.dtype in ACTIVATION_DTYPES
    return stored.dtype == torch.int8 and scale.dtype == torch.float32


@dataclass(frozen=True, eq=False)
class Plan:
    """A stored weight laid out for the kernels once, so that each call passes one address.

    It keeps the tensors it points into alive (``values`` weakly: the plan is dropped with it) and is
    reused while a weight presents the very same tensor objects. The stored tensors of a weight are never
    resized or restrided in place (nothing in the library does; nothing else should).
    """

    values: weakref.ref
    dictionary: Optional[torch.Tensor]
    dictionary_scale: Optional[torch.Tensor]
    value_scale: Optional[torch.Tensor]
    bitmask: torch.Tensor
    stored: _StoredWeight
    address: int
    in_features: int
    k: int
    out: int

    def holds(self, dictionary, dictionary_scale, values, value_scale, bitmask) -> bool:
        return (
            self.values() is values
            and self.bitmask is bitmask
            and self.dictionary is dictionary
            and self.value_scale is value_scale
            and self.dictionary_scale is dictionary_scale
        )


_plans: dict[int, Plan] = {}  # id(values) -> its plan; an entry leaves with its values tensor


def _fits(tensor: Optional[torch.Tensor], shape: tuple[int, ...]) -> bool:
    return tensor is None or (
        type(tensor) is torch.Tensor and tensor.is_cpu and tensor.is_contiguous() and tensor.shape == shape
    )


def _address(tensor: Optional[torch.Tensor]) -> Optional[int]:
    return None if tensor is None else tensor.data_ptr()


def _new_plan(dictionary, dictionary_scale, values, value_scale, bitmask, k: int) -> Optional[Plan]:
    if _kernels() is None or values.dim() != 2 or not readable(values, value_scale) or bitmask.dtype != torch.uint8:
        return None
    out, s = values.shape
    in_features = 0 if dictionary is None else dictionary.shape[-1]
    if dictionary is not None and not readable(dictionary, dictionary_scale):
        return None
    shapes = (
        (dictionary, (k, in_features)),
        (dictionary_scale, (k,)),
        (values, (out, s)),
        (value_scale, (out,)),
        (bitmask, (out, (k + 7) // 8)),
    )
    if not all(_fits(tensor, shape) for tensor, shape in shapes):
        return None
    dictionary_type = 0 if dictionary is None else _ELEMENT_TYPES[dictionary.dtype]
    stored = _StoredWeight(
        _address(dictionary),
        _address(dictionary_scale),
        values.data_ptr(),
        _address(value_scale),
        bitmask.data_ptr(),
        dictionary_type,
        _ELEMENT_TYPES[values.dtype],
        in_features,
        k,
        s,
        out,
    )
    key = id(values)
    if key not in _plans:
        weakref.finalize(values, _plans.pop, key, None)
    plan = Plan(
        weakref.ref(values),
        dictionary,
        dictionary_scale,
        value_scale,
        bitmask,
        stored,
        ctypes.addressof(stored),
        in_features,
        k,
        out,
    )
    _plans[key] = plan
    return plan


def dictionary_plan(
    dictionary: torch.Tensor,
    dictionary_scale: Optional[torch.Tensor],
    values: torch.Tensor,
    value_scale: Optional[torch.Tensor],
    bitmask: torch.Tensor,
) -> Optional[Plan]:
    """The plan for both stages, or ``None`` where the kernels cannot read these tensors as they are
    (not contiguous CPU tensors of :func:`readable` dtypes and matching shapes, or no kernels here)."""
    plan = _plans.get(id(values))
    if plan is not None and plan.holds(dictionary, dictionary_scale, values, value_scale, bitmask):
        return plan
    if type(dictionary) is not torch.Tensor or dictionary.dim() != 2:  # e.g. a torchao-quantised dictionary
        return None
    return _new_plan(dictionary, dictionary_scale, values, value_scale, bitmask, dictionary.shape[0])


def codes_plan(
    values: torch.Tensor, value_scale: Optional[torch.Tensor], bitmask: torch.Tensor, k: int
) -> Optional[Plan]:
    """The plan for stage 2 alone (codes over ``k`` atoms), or ``None`` as :func:`dictionary_plan`."""
    plan = _plans.get(id(values))
    if plan is not None and plan.k == k and plan.holds(None, None, values, value_scale, bitmask):
        return plan
    return _new_plan(None, None, values, value_scale, bitmask, k)


def _refuse(invalid: int, plan: Plan) -> None:
    if invalid < 0:
        raise MemoryError("the native decode kernel could not allocate its scratch")
    stored = plan.stored
    raise ValueError(f"bitmask: {invalid} of {stored.out} rows do not set exactly s={stored.s} bits below k={stored.k}")


# The calls below run once per layer and decoded token, so they avoid every tensor op they can: each one's
# fixed cost is a visible share of a small layer's decode.


def _run(kernel, plan: Plan, x: torch.Tensor, width: int, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    activation_type = _ACTIVATION_TYPES.get(x.dtype)
    if x.shape[-1] != width or activation_type is None or not (x.is_cpu and x.is_contiguous()):
        return None
    if bias is not None and not (
        bias.dtype == x.dtype and bias.shape == (plan.out,) and bias.is_cpu and bias.is_contiguous()
    ):
        return None
    y = x.new_empty((*x.shape[:-1], plan.out))
    tokens = x.numel() // width if width else 0
    bias_address = None if bias is None else bias.data_ptr()
    invalid = kernel(
        plan.address, x.data_ptr(), tokens, bias_address, y.data_ptr(), activation_type, torch.get_num_threads()
    )
    if invalid:
        _refuse(invalid, plan)
    return y


def dictionary_decode(plan: Plan, x: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(x @ D~^T) @ C^T + bias`` for ``x`` ``(..., in)``, or ``None`` when ``x`` or ``bias`` is not what the
    kernel reads (contiguous CPU tensors of the plan's widths in one of ``ACTIVATION_DTYPES``, ``bias`` in
    ``x``'s): the caller then takes torch ops, which also raise the usual errors for mismatched shapes."""
    return _run(_kernels().dictionary_decode, plan, x, plan.in_features, bias)


def codes_gemv(plan: Plan, z: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``z @ C^T + bias`` for ``z`` ``(..., k)``, or ``None`` as :func:`dictionary_decode`."""
    return _run(_kernels().codes_gemv, plan, z, plan.k, bias)


def codes_tile(plan: Plan, start: int, stop: int, tile: torch.Tensor) -> None:
    """Write output rows ``[start, stop)`` of the codes (``C^T``) into ``tile``, a contiguous CPU
    ``(stop - start, k)`` tensor of one of ``ACTIVATION_DTYPES`` (int8 values times their row scale, rounded
    to ``tile.dtype`` as ``dequantize_values`` rounds them)."""
    invalid = _kernels().codes_tile(
        plan.address, start, stop, tile.data_ptr(), _ACTIVATION_TYPES[tile.dtype], torch.get_num_threads()
    )
    if invalid:
        _refuse(invalid, plan)
