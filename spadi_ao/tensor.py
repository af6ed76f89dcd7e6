"""Weight tensor subclasses: the compressed form an ``nn.Linear`` keeps in place of its dense weight.

Both subclasses report the logical ``(out, in)`` shape and dtype of the weight they replace, so the
module, ``state_dict``, ``.to()`` and ``torch.compile`` treat them like any torchao weight; ``F.linear``
on them runs the factored product and never materialises the dense matrix.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torchao.quantization import Int8Tensor, IntxUnpackedToInt8Tensor
from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs
from torchao.utils import TorchAOBaseTensor

from spadi_ao.format import unpack_codes
from spadi_ao.kernels import cpu, native
from spadi_ao.kernels.op import dequantize_dictionary, dequantize_values
from spadi_ao.kernels.selector import eager_cpu_route, eager_native_decode

__all__ = ["DictionaryTensor", "LowRankTensor", "stored_bytes", "is_compressed_weight"]

aten = torch.ops.aten


def _nbytes(tensor: Optional[torch.Tensor]) -> int:
    """Bytes really held: a tensor subclass (also a nested torchao one, also as a Parameter) counts its inner
    tensors in their storage dtype, e.g. 1 byte per int4 value kept in an int8 container."""
    if tensor is None:
        return 0
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(_nbytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _part_name(tensor: torch.Tensor) -> str:
    """``bfloat16`` for a plain part, the class name for a torchao-quantised one."""
    if type(tensor) is not torch.Tensor and is_traceable_wrapper_subclass(tensor) and not is_compressed_weight(tensor):
        return type(tensor).__name__
    return str(tensor.dtype).removeprefix("torch.")


def _cache_layout(tensor: Optional[torch.Tensor]) -> Any:
    """What a compiled graph depends on: class, dtype, shape, strides, device and nesting, never values."""
    if tensor is None:
        return None
    if is_traceable_wrapper_subclass(tensor):
        names, attributes = tensor.__tensor_flatten__()
        inner = tuple((name, _cache_layout(getattr(tensor, name))) for name in names)
        return (
            type(tensor).__qualname__,
            tuple(tensor.shape),
            str(tensor.dtype),
            tensor.requires_grad,
            repr(attributes),
            inner,
        )
    return (
        str(tensor.dtype),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.storage_offset(),
        tensor.device.type,
        tensor.requires_grad,
    )


def _stable_hash_for_caching(self: torch.Tensor) -> str:
    """PT2's AOT-autograd cache key for this weight (torch asks traceable subclasses for one): the same in
    every process for the same layout, different when the layout (and so the traced graph) differs."""
    return hashlib.blake2b(repr(_cache_layout(self)).encode(), digest_size=16).hexdigest()


def _dense_dictionary(
    dictionary: torch.Tensor, dictionary_scale: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    if is_traceable_wrapper_subclass(dictionary):  # a torchao-quantised dictionary dequantises itself
        return dictionary.dequantize().to(dtype)
    return dequantize_dictionary(dictionary, dictionary_scale, dtype)


class DictionaryTensor(TorchAOBaseTensor):
    """``W ~= C^T D~``: a dictionary of ``k`` atoms and ``s`` sparse codes per output row.

    Inner tensors (see ``spadi_ao.format``): ``dictionary`` (k, in), ``values`` (out, s),
    ``bitmask`` (out, ceil(k/8)) uint8, and optional int8 scales ``dictionary_scale`` (k,) and
    ``value_scale`` (out,) when the dictionary or the values are stored as int8. ``dictionary`` may also be
    a torchao-quantised tensor (see ``spadi_ao.integrations.torchao``), which then runs the first GEMM.
    """

    tensor_data_names = ["dictionary", "values", "bitmask"]
    tensor_attribute_names = ["dtype"]
    optional_tensor_data_names = ["dictionary_scale", "value_scale"]

    def __new__(
        cls,
        dictionary: torch.Tensor,
        values: torch.Tensor,
        bitmask: torch.Tensor,
        dtype: torch.dtype,
        dictionary_scale: Optional[torch.Tensor] = None,
        value_scale: Optional[torch.Tensor] = None,
    ):
        shape = (values.shape[0], dictionary.shape[1])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=values.device, requires_grad=False)

    def __init__(
        self,
        dictionary: torch.Tensor,
        values: torch.Tensor,
        bitmask: torch.Tensor,
        dtype: torch.dtype,
        dictionary_scale: Optional[torch.Tensor] = None,
        value_scale: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        self.dictionary = dictionary
        self.values = values
        self.bitmask = bitmask
        self.dictionary_scale = dictionary_scale
        self.value_scale = value_scale

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """``F.linear`` in eager CPU decode goes to the native kernel before the generic dispatch
        (the generic dispatch is a visible share of a small layer's decode); everything else dispatches like any
        torchao tensor."""
        if func is F.linear and not kwargs and len(args) > 1 and type(args[1]) is cls:
            decoded = _inference_decode(args[0], args[1], args[2] if len(args) > 2 else None)
            if decoded is not None:
                return decoded
        return super().__torch_function__(func, types, args, kwargs)

    @property
    def num_atoms(self) -> int:
        return self.dictionary.shape[0]

    @property
    def nonzeros_per_row(self) -> int:
        return self.values.shape[1]

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = output_dtype or self.dtype
        atoms = _dense_dictionary(self.dictionary, self.dictionary_scale, torch.float32)
        codes = unpack_codes(
            dequantize_values(self.values, self.value_scale, torch.float32), self.bitmask, self.num_atoms
        )
        return (codes @ atoms).to(dtype)

    def stored_bytes(self) -> int:
        return sum(_nbytes(getattr(self, n)) for n in self.tensor_data_names + self.optional_tensor_data_names)

    def _quantization_type(self) -> str:
        """What ``repr`` and a Linear's ``extra_repr`` show, as torchao's tensors do: no inner tensor data."""
        values = f"{_part_name(self.values)}{'+scale' if self.value_scale is not None else ''}"
        dictionary = f"{_part_name(self.dictionary)}{'+scale' if self.dictionary_scale is not None else ''}"
        return (
            f"shape={tuple(self.shape)}, k={self.num_atoms}, s={self.nonzeros_per_row}, dtype={_part_name(self)}, "
            f"dictionary={dictionary}, values={values}, stored_bytes={self.stored_bytes()}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._quantization_type()})"

    _stable_hash_for_caching = _stable_hash_for_caching


class LowRankTensor(TorchAOBaseTensor):
    """``W ~= up @ down``: the SVD-LLM baseline, ``down`` (rank, in) and ``up`` (out, rank)."""

    tensor_data_names = ["down", "up"]
    tensor_attribute_names = ["dtype"]

    def __new__(cls, down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype):
        shape = (up.shape[0], down.shape[1])
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=up.device, requires_grad=False)

    def __init__(self, down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.down = down
        self.up = up

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return (self.up.float() @ self.down.float()).to(output_dtype or self.dtype)

    def stored_bytes(self) -> int:
        return _nbytes(self.down) + _nbytes(self.up)

    def _quantization_type(self) -> str:
        return (
            f"shape={tuple(self.shape)}, rank={self.rank}, dtype={_part_name(self)}, stored_bytes={self.stored_bytes()}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._quantization_type()})"

    _stable_hash_for_caching = _stable_hash_for_caching


def _linear_args(args: tuple, kwargs: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(input, weight, bias)`` of a linear call, each given by position or by name."""
    given = dict(zip(("input", "weight", "bias"), args))
    given.update(kwargs or {})
    return given["input"], given["weight"], given.get("bias")


def _torchao_dictionary_linear(x: torch.Tensor, weight: DictionaryTensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``z = x D~^T`` on torchao's kernels, then the codes from their packed form.

    Eager calls run ``spadi_ao.kernels.cpu.multiply_codes`` (native decode kernel, or one small dense tile of
    the codes at a time, also in the backward pass); a compiled graph traces the same tiles in torch ops.
    """
    atoms = F.linear(x, weight.dictionary)
    if torch.compiler.is_compiling():
        return cpu.codes_product(atoms, weight.values, weight.value_scale, weight.bitmask, bias)
    return cpu.multiply_codes(atoms, weight.values, weight.value_scale, weight.bitmask, bias)


def _inference_decode(
    x: torch.Tensor, weight: DictionaryTensor, bias: Optional[torch.Tensor]
) -> Optional[torch.Tensor]:
    """Eager CPU decode with nothing to trace or differentiate (``selector.eager_native_decode``): the native
    kernel at once on the weight's cached ``native.Plan`` (which checked the stored tensors once), else None."""
    if not eager_native_decode(x):
        return None
    plan = native.dictionary_plan(
        weight.dictionary, weight.dictionary_scale, weight.values, weight.value_scale, weight.bitmask
    )
    return None if plan is None else native.dictionary_decode(plan, x, bias)


@DictionaryTensor.implements(aten.linear.default)
@DictionaryTensor.implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, weight, bias = _linear_args(args, kwargs)
    dictionary = weight.dictionary
    if type(dictionary) is not torch.Tensor and is_traceable_wrapper_subclass(dictionary):
        return _torchao_dictionary_linear(x, weight, bias)
    stored = (weight.dictionary_scale, weight.values, weight.value_scale)
    if eager_cpu_route(x, (x, weight, dictionary, *stored, bias)):
        return cpu.dictionary_linear(
            x, dictionary, weight.dictionary_scale, weight.values, weight.value_scale, weight.bitmask, bias
        )
    return torch.ops.spadi_ao.dictionary_linear(
        x, dictionary, weight.dictionary_scale, weight.values, weight.value_scale, weight.bitmask, bias
    )


@LowRankTensor.implements(aten.linear.default)
@LowRankTensor.implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, weight, bias = _linear_args(args, kwargs)
    return F.linear(F.linear(x, weight.down), weight.up, bias)


def is_compressed_weight(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, (DictionaryTensor, LowRankTensor))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly compressed or torchao-quantised) weight really holds."""
    if isinstance(tensor, (DictionaryTensor, LowRankTensor)):
        return tensor.stored_bytes()
    return _nbytes(tensor)


# ``torch.load(weights_only=True)`` of compressed state dicts, also with a torchao-quantised dictionary.
torch.serialization.add_safe_globals(
    [DictionaryTensor, LowRankTensor, Int8Tensor, IntxUnpackedToInt8Tensor, QuantizeTensorToInt8Kwargs]
)

from spadi_ao import tensor_ops as _tensor_ops  # noqa: E402,F401  (dtype casts, slices, copies: registered on the classes above)
