"""CPU route for the dictionary linear (and the torch-ops route of any device without Triton).

Decode (at most ``selector.NATIVE_MAX_TOKENS`` tokens of float32, bfloat16 or float16) runs both stages in
the native C kernel (``spadi_ao.kernels.native``), which reads the packed codes themselves (16- or 32-bit
floats, or int8 with row scales) and needs no cache. Everything else, and machines where that kernel cannot
be built, takes the torch ops below.

Stage 1 is one BLAS call, ``z = x @ D~^T``. Stage 2 multiplies ``z`` by the codes, and on CPU the only
fast way to do that with stock torch ops is a GEMM against the codes decompressed to a dense ``(out, k)``
matrix. Measured on 2 Xeon (Sapphire Rapids) cores, fp32, a 4096x4096 layer at 50% honest compression
(k=1337, s=669), per call:

* dense GEMV over the decompressed codes: 0.77 ms at M=1, 2.5 ms at M=8;
* gather-sum from unpacked indices: ``embedding_bag`` 10.6 ms (M=1) / 3.8 ms (M=8), ``take`` / advanced
  indexing 4-12 ms, an Inductor-compiled gather-sum 2.3 ms; MKL CSR ``mv`` with int32 indices 0.9 ms;
* decompressing the bitmask on every call: ~40-80 ms, against 2.4 ms for the whole dense layer at M=1.

So the torch route caches the decompressed codes, which is what makes it faster than the dense layer at
all. **The cache costs memory**: ``out * k * dtype_size`` bytes per layer and compute dtype, kept next
to the stored ``out * s`` values, i.e. ``2x`` the values' bytes at ``k / s = 2`` in the same dtype (more
for int8 values, which are cached dequantised). :func:`code_cache_nbytes` reports the total,
:func:`clear_code_cache` frees it and :func:`code_cache_disabled` runs without it (decompressing every
call). Entries are keyed weakly on the ``bitmask`` tensor and dropped with it; they are rebuilt when the
``values``/``value_scale`` objects or any of the three tensors' version counters change. In-place edits
of *inference* tensors are not tracked (they have no version counter). The cache lives inside the custom
op's implementation, so compiled graphs never see it.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from spadi_ao.format import unpack_mask
from spadi_ao.kernels import native
from spadi_ao.kernels.reference import dequantize_dictionary, dequantize_values
from spadi_ao.kernels.selector import select_kernel

__all__ = [
    "dictionary_linear",
    "multiply_codes",
    "decompress_codes",
    "dense_codes",
    "code_cache_nbytes",
    "clear_code_cache",
    "forget_cached_codes",
    "code_cache_disabled",
]


@dataclass
class _Entry:
    values: weakref.ref
    value_scale: Optional[weakref.ref]
    versions: tuple[int, ...]
    codes: torch.Tensor


_CPU = torch.device("cpu")
_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()  # bitmask -> {dtype: _Entry}
_cache_enabled = True


def _version(tensor: Optional[torch.Tensor]) -> int:
    return -1 if tensor is None or tensor.is_inference() else tensor._version


def _is(ref: Optional[weakref.ref], tensor: Optional[torch.Tensor]) -> bool:
    return (ref is None and tensor is None) or (ref is not None and ref() is tensor)


def decompress_codes(
    values: torch.Tensor, value_scale: Optional[torch.Tensor], bitmask: torch.Tensor, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense ``(out, k)`` codes in ``dtype``, int8 values dequantised per output row."""
    mask = unpack_mask(bitmask, k)
    codes = torch.zeros(mask.shape, dtype=dtype, device=values.device)
    # masked_scatter_ fills the set bits in row-major order, i.e. in the increasing-atom order of ``values``.
    return codes.masked_scatter_(mask, dequantize_values(values, value_scale, dtype))


def dense_codes(
    values: torch.Tensor, value_scale: Optional[torch.Tensor], bitmask: torch.Tensor, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """:func:`decompress_codes`, served from the cache while the packed tensors are unchanged."""
    if not _cache_enabled:
        return decompress_codes(values, value_scale, bitmask, k, dtype)
    versions = (_version(values), _version(value_scale), _version(bitmask))
    per_dtype = _cache.setdefault(bitmask, {})
    entry = per_dtype.get(dtype)
    if entry is None or entry.versions != versions or not (_is(entry.values, values) and _is(entry.value_scale, value_scale)):
        scale_ref = None if value_scale is None else weakref.ref(value_scale)
        entry = _Entry(weakref.ref(values), scale_ref, versions, decompress_codes(values, value_scale, bitmask, k, dtype))
        per_dtype[dtype] = entry
    return entry.codes


def code_cache_nbytes() -> int:
    """Bytes currently held by cached dense codes (on top of the stored compressed weights)."""
    return sum(e.codes.numel() * e.codes.element_size() for per_dtype in _cache.values() for e in per_dtype.values())


def clear_code_cache() -> None:
    _cache.clear()


def forget_cached_codes(weights: Iterable[torch.Tensor]) -> None:
    """Drop the cached codes of these compressed weights (others are left alone): for callers that ran
    them once, e.g. sequential compression propagating through a finished block."""
    for weight in weights:
        bitmask = getattr(weight, "bitmask", None)
        if bitmask is not None:
            _cache.pop(bitmask, None)


@contextlib.contextmanager
def code_cache_disabled() -> Iterator[None]:
    """Decompress the codes on every call inside this block (nothing is cached or read from the cache)."""
    global _cache_enabled
    previous, _cache_enabled = _cache_enabled, False
    try:
        yield
    finally:
        _cache_enabled = previous


def _project(x: torch.Tensor, dictionary: torch.Tensor, dictionary_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``z = x @ D~^T``; per-atom int8 scales go on the ``(M, k)`` output instead of the ``(k, in)`` weight."""
    if dictionary_scale is None or x.dtype == torch.float16:  # fp16 could overflow before scaling
        return F.linear(x, dequantize_dictionary(dictionary, dictionary_scale, x.dtype))
    return F.linear(x, dictionary.to(x.dtype)) * dictionary_scale.to(x.dtype)


def _contiguous(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()  # the tensor itself when it already is


def _native_decode(x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether ``select_kernel`` sends these ``x`` to the native kernel and no gradient has to flow through
    it (it has no autograd formula; the op's own wraps this module)."""
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    device = _CPU if x.is_cpu else x.device  # x.device builds a new object per call, a measurable cost here
    return select_kernel(device, x.dtype, x.numel() // max(x.shape[-1], 1)) == "native_decode"


def multiply_codes(
    z: torch.Tensor, values: torch.Tensor, value_scale: Optional[torch.Tensor], bitmask: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``z @ C^T + b``: the native kernel on the packed codes for decode, else the cached dense codes."""
    if _native_decode(z, values, bias):
        k = z.shape[-1]
        plan = native.codes_plan(values, value_scale, bitmask, k) or native.codes_plan(*map(_contiguous, (values, value_scale, bitmask)), k)
        y = None if plan is None else native.codes_gemv(plan, z.contiguous(), _contiguous(bias))
        if y is not None:
            return y
    return F.linear(z, dense_codes(values, value_scale, bitmask, z.shape[-1], z.dtype), bias)


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
    if _native_decode(x, values, bias):
        stored = (dictionary, dictionary_scale, values, value_scale, bitmask)
        plan = native.dictionary_plan(*stored) or native.dictionary_plan(*map(_contiguous, stored))
        y = None if plan is None else native.dictionary_decode(plan, x.contiguous(), _contiguous(bias))
        if y is not None:
            return y
    return multiply_codes(_project(x, dictionary, dictionary_scale), values, value_scale, bitmask, bias)
