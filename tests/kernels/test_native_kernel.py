"""The native CPU decode kernel (``spadi_ao.kernels.native``) against an independent float64 product.

It needs Linux x86-64 with AVX-512 and a C compiler; elsewhere these tests skip (saying why) and the
fallback tests check that the torch-ops route takes over.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spadi_ao import DictionaryTensor
from spadi_ao import tensor as tensor_module
from spadi_ao.format import pack_codes, unpack_codes
from spadi_ao.kernels import cpu, native, select_kernel
from spadi_ao.kernels.selector import NATIVE_MAX_TOKENS

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.unavailable_reason()}"
)


def packed_codes(out_features: int, k: int, s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(out_features, k, generator=g).argsort(dim=1)[:, :s]
    return pack_codes(indices, torch.randn(out_features, s, generator=g), k)


def dense_product(z: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, bias) -> torch.Tensor:
    y = z.double() @ unpack_codes(values.double(), bitmask, z.shape[-1]).T
    return y if bias is None else y + bias.double()


STORAGE = ["float32", "bfloat16", "float16", "int8"]
ACTIVATIONS = [torch.float32, torch.bfloat16, torch.float16]
# Half the spacing of representable numbers at 1, relative: what rounding the result to its dtype may add.
ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def stored(rows: torch.Tensor, kind: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rows as the library stores them: a float dtype, or symmetric int8 with a float32 scale per row."""
    if kind != "int8":
        return rows.to(getattr(torch, kind)), None
    scale = rows.abs().amax(dim=1).clamp_min(1e-8) / 127
    return (rows / scale.unsqueeze(1)).round().to(torch.int8), scale


def within_tolerance(y: torch.Tensor, expected: torch.Tensor, scale: float) -> bool:
    """float32 accumulation (relative to ``scale``, the sum of the absolute terms) plus one rounding of the
    result to its dtype."""
    error = (y.double() - expected).abs()
    return bool((error <= 2e-6 * scale + ROUNDING[y.dtype] * expected.abs()).all())


def floats(rows: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    return rows.double() if scale is None else rows.double() * scale.double().unsqueeze(1)


@contextlib.contextmanager
def torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A kernel built from scratch into a private cache, forgotten again afterwards."""
    monkeypatch.setenv("SPADI_AO_CACHE", str(tmp_path))
    native._kernels.cache_clear()
    yield tmp_path
    native._kernels.cache_clear()


# What both kernel entries are drawn over besides their shapes.
STORED_CODES = dict(
    density=st.floats(0.0, 1.0),
    values_kind=st.sampled_from(STORAGE),
    activation=st.sampled_from(ACTIVATIONS),
    bias=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)


def stored_codes(out_features: int, k: int, density: float, kind: str, seed: int):
    """Packed codes with ``round(density * k)`` (at least 1) non-zeros per row, stored as ``kind``."""
    values, bitmask = packed_codes(out_features, k, max(1, round(density * k)), seed)
    return (*stored(values, kind), bitmask)


@needs_native
@given(
    out_features=st.integers(1, 48),
    k=st.integers(1, 80),  # across the 16-slot chunks, the odd last byte and the two-chunk unrolling
    lead=st.sampled_from([(), (1,), (3,)]),
    tokens=st.integers(1, 9),
    **STORED_CODES,
)
@settings(max_examples=150, deadline=None)
def test_codes_gemv_matches_dense_product(
    out_features, k, density, lead, tokens, values_kind, activation, bias, threads, seed
):
    values, value_scale, bitmask = stored_codes(out_features, k, density, values_kind, seed)
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(*lead, tokens, k, generator=g).to(activation)
    b = torch.randn(out_features, generator=g).to(activation) if bias else None
    with torch_threads(threads):
        y = native.codes_gemv(native.codes_plan(values, value_scale, bitmask, k), z, b)
    expected = dense_product(z, floats(values, value_scale), bitmask, b)
    assert y.shape == expected.shape and y.dtype == activation
    scale = (z.double().abs() @ unpack_codes(floats(values, value_scale).abs(), bitmask, k).T).max().item() + 1.0
    assert within_tolerance(y, expected, scale)


@needs_native
@given(
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 70),  # whole and partial 16-float chunks of the dictionary rows
    k=st.integers(1, 70),
    lead=st.sampled_from([(), (1,), (2,)]),
    tokens=st.integers(1, 6),
    dictionary_kind=st.sampled_from(STORAGE),
    **STORED_CODES,
)
@settings(max_examples=200, deadline=None)
def test_dictionary_decode_matches_dense_layer(
    out_features, in_features, k, density, lead, tokens, dictionary_kind, values_kind, activation, bias, threads, seed
):
    values, value_scale, bitmask = stored_codes(out_features, k, density, values_kind, seed)
    g = torch.Generator().manual_seed(seed + 1)
    dictionary, dictionary_scale = stored(torch.randn(k, in_features, generator=g), dictionary_kind)
    x = torch.randn(*lead, tokens, in_features, generator=g).to(activation)
    b = torch.randn(out_features, generator=g).to(activation) if bias else None
    with torch_threads(threads):
        y = native.dictionary_decode(
            native.dictionary_plan(dictionary, dictionary_scale, values, value_scale, bitmask), x, b
        )
    codes, atoms = unpack_codes(floats(values, value_scale), bitmask, k), floats(dictionary, dictionary_scale)
    expected = x.double() @ (codes @ atoms).T + (
        0 if b is None else b.double()
    )  # the dense weight, built independently
    assert y.shape == expected.shape and y.dtype == activation
    scale = (x.double().abs() @ (codes.abs() @ atoms.abs()).T).max().item() + 1.0
    assert within_tolerance(y, expected, scale)


@needs_native
def test_non_contiguous_inputs():
    """The CPU route hands the kernel contiguous tensors whatever it is given."""
    values, bitmask = packed_codes(10, 24, 9, seed=4)
    dictionary = torch.randn(16, 24).T  # (24, 16) seen as k=24 atoms of 16 inputs, column-major
    x = torch.randn(16, 3).T  # 3 tokens, strided
    expected = (x.double() @ dictionary.double().T) @ unpack_codes(values.double(), bitmask, 24).T
    torch.testing.assert_close(
        cpu.dictionary_linear(x, dictionary, None, values, None, bitmask, None).double(), expected, rtol=1e-5, atol=1e-5
    )
    z = (x @ dictionary.T).T.contiguous().T
    torch.testing.assert_close(
        cpu.multiply_codes(z, values, None, bitmask, None).double(), expected, rtol=1e-5, atol=1e-5
    )


@needs_native
@pytest.mark.parametrize("activation", [torch.bfloat16, torch.float16])
def test_16_bit_results_round_to_nearest_and_keep_nan_and_inf(activation):
    """Outputs are the float32 results rounded to nearest even, as ``Tensor.to`` rounds; NaN and Inf pass."""
    values, bitmask = packed_codes(40, 32, 9, seed=10)
    z32 = torch.randn(3, 32, generator=torch.Generator().manual_seed(10)) * 1000
    z = z32.to(activation)
    plan = native.codes_plan(values, None, bitmask, 32)
    y = native.codes_gemv(plan, z, None)
    exact32 = native.codes_gemv(plan, z.float(), None)  # the same float32 sums, before rounding
    assert torch.equal(y, exact32.to(activation))
    z[0, :] = float("nan")
    z[1, :] = float("inf")
    y = native.codes_gemv(plan, z, None)
    assert y[0].isnan().all() and not y[2].isnan().any()
    assert (y[1].isinf() | y[1].isnan()).all()  # +Inf times mixed-sign values: Inf, or NaN where they cancel


@needs_native
def test_threads_split_rows_without_changing_them():
    values, bitmask = packed_codes(300, 70, 33, seed=3)
    z = torch.randn(5, 70)
    x = torch.randn(5, 30, generator=torch.Generator().manual_seed(0))
    dictionary = torch.ones(70, 30)
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            codes_plan = native.codes_plan(values, None, bitmask, 70)
            results += [
                native.codes_gemv(codes_plan, z, None),
                native.dictionary_decode(native.dictionary_plan(dictionary, None, values, None, bitmask), x, None),
            ]
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


@needs_native
def test_malformed_bitmask_is_refused():
    values, bitmask = packed_codes(6, 20, 5, seed=0)
    z = torch.randn(2, 20)
    extra = bitmask.clone()
    extra[2, 0] |= ~extra[2, 0]  # row 2 now sets more than s bits
    with pytest.raises(ValueError, match=r"bitmask: 1 of 6 rows .* s=5 .* k=20"):
        native.codes_gemv(native.codes_plan(values, None, extra, 20), z, None)
    past_k = bitmask.clone()
    past_k[4, -1] |= 0x80  # slot 23 >= k = 20
    with pytest.raises(ValueError, match="bitmask"):
        native.codes_gemv(native.codes_plan(values, None, past_k, 20), z, None)
    with pytest.raises(ValueError, match="bitmask"):
        native.dictionary_decode(
            native.dictionary_plan(torch.randn(20, 5), None, values, None, extra), torch.randn(2, 5), None
        )
    # rows validated on every call, not when the plan was made: a bitmask edited in place is refused too
    plan = native.codes_plan(values, None, bitmask, 20)
    native.codes_gemv(plan, z, None)
    bitmask.copy_(extra)
    with pytest.raises(ValueError, match="bitmask"):
        native.codes_gemv(plan, z, None)


@needs_native
def test_plans_are_reused_while_the_weight_holds_the_same_tensors():
    values, bitmask = packed_codes(12, 20, 6, seed=7)
    dictionary = torch.randn(20, 9)
    plan = native.dictionary_plan(dictionary, None, values, None, bitmask)
    assert native.dictionary_plan(dictionary, None, values, None, bitmask) is plan
    other = torch.randn(20, 9)  # a weight given a new dictionary object gets a new plan, pointing at it
    replaced = native.dictionary_plan(other, None, values, None, bitmask)
    assert replaced is not plan and replaced.stored.dictionary == other.data_ptr()
    x = torch.randn(2, 9)
    expected = dense_product(x.double() @ other.double().T, values, bitmask, None)
    torch.testing.assert_close(native.dictionary_decode(replaced, x, None).double(), expected, rtol=1e-5, atol=1e-5)
    key = id(values)
    del values, replaced, plan
    assert key not in native._plans  # dropped with its values tensor


@needs_native
def test_plans_refuse_what_the_kernel_cannot_read():
    values, bitmask = packed_codes(12, 20, 6, seed=8)
    dictionary = torch.randn(20, 9)
    assert native.dictionary_plan(dictionary.T.contiguous().T, None, values, None, bitmask) is None  # strided
    assert native.dictionary_plan(dictionary.double(), None, values, None, bitmask) is None
    assert native.dictionary_plan(torch.randn(30, 9), None, values, None, bitmask) is None  # k too wide for the bitmask
    assert native.codes_plan(values, torch.ones(12), bitmask, 20) is None  # a scale needs int8 values
    assert native.codes_plan(values, None, bitmask[:, :2], 20) is None  # bitmask too narrow for k
    plan = native.dictionary_plan(dictionary, None, values, None, bitmask)
    assert native.dictionary_decode(plan, torch.randn(1, 10), None) is None  # x of the wrong width
    assert native.dictionary_decode(plan, torch.randn(1, 9).double(), None) is None
    assert native.dictionary_decode(plan, torch.randn(1, 9), torch.randn(11)) is None  # bias of the wrong length


@needs_native
def test_wrong_input_width_raises_like_a_dense_layer():
    """Decode once read the first ``in`` floats of a wider input and answered: it must fail as F.linear does."""
    values, bitmask = packed_codes(16, 8, 4, seed=9)
    weight = DictionaryTensor(torch.randn(8, 16), values, bitmask, torch.float32)
    with torch.inference_mode():
        for width in (20, 10):
            with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
                F.linear(torch.randn(1, width), weight)
            with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
                F.linear(torch.randn(1, width), weight.dequantize())


@needs_native
def test_layers_take_the_native_route_for_decode():
    for dtype in native.ACTIVATION_DTYPES:
        assert select_kernel(torch.device("cpu"), dtype, NATIVE_MAX_TOKENS) == "native_decode"
    assert select_kernel(torch.device("cpu"), torch.float32, NATIVE_MAX_TOKENS + 1) == "torch"
    assert select_kernel(torch.device("cpu"), torch.float64, 1) == "torch"
    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(40, 24, generator=g)
    values, bitmask = packed_codes(30, 40, 13, seed=1)
    weight = DictionaryTensor(dictionary, values, bitmask, torch.float32)
    bias = torch.randn(30, generator=g)
    for tokens in (1, NATIVE_MAX_TOKENS):
        x = torch.randn(1, tokens, 24, generator=g)
        expected = dense_product(x.double() @ dictionary.double().T, values, bitmask, bias)
        with torch.inference_mode():
            y = F.linear(x, weight, bias)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            torch.ops.spadi_ao.dictionary_linear(x, dictionary, None, values, None, bitmask, bias), y
        )


@needs_native
@pytest.mark.parametrize("kind", STORAGE)
def test_inference_decode_takes_the_short_route(monkeypatch, kind):
    """Eager decode under inference mode goes straight to the kernel: float32, a bfloat16 or float16 model,
    and the int8 storage of ``spadi_ao.integrations.torchao``; anything unusual takes the general route, and
    both give the op's result bit for bit."""
    calls = []
    short_route = tensor_module._inference_decode
    monkeypatch.setattr(tensor_module, "_inference_decode", lambda *args: calls.append(short_route(*args)) or calls[-1])
    dtype = torch.float32 if kind == "int8" else getattr(torch, kind)
    g = torch.Generator().manual_seed(6)
    dictionary, dictionary_scale = stored(torch.randn(33, 20, generator=g), kind)
    values, bitmask = packed_codes(17, 33, 11, seed=6)
    values, value_scale = stored(values, kind)
    weight = DictionaryTensor(dictionary, values, bitmask, dtype, dictionary_scale, value_scale)
    bias = torch.randn(17, generator=g).to(dtype)
    x = torch.randn(1, 3, 20, generator=g).to(dtype)
    strided = torch.randn(20, 3, generator=g).T.to(dtype)  # not contiguous
    with torch.inference_mode():
        for inputs, short in ((x, True), (strided, False)):
            calls.clear()
            y = F.linear(inputs, weight, bias)
            assert (calls[-1] is not None) == short and y.dtype == dtype
            assert torch.equal(
                y,
                torch.ops.spadi_ao.dictionary_linear(
                    inputs, dictionary, dictionary_scale, values, value_scale, bitmask, bias
                ),
            )
            atoms, codes = floats(dictionary, dictionary_scale), unpack_codes(floats(values, value_scale), bitmask, 33)
            expected = (inputs.double() @ atoms.T) @ codes.T + bias.double()
            scale = (inputs.double().abs() @ atoms.abs().T @ codes.abs().T).max().item() + 1.0
            assert within_tolerance(y, expected, scale)


@needs_native
def test_gradients_bypass_the_native_kernel():
    """Called outside the op (a torchao-quantised dictionary's eager path), stage 2 must keep autograd."""
    values, bitmask = packed_codes(6, 16, 5, seed=5)
    z = torch.randn(1, 16, generator=torch.Generator().manual_seed(5)).requires_grad_()
    y = cpu.multiply_codes(z, values, None, bitmask, None)
    (grad,) = torch.autograd.grad(y.square().sum(), z)
    codes = unpack_codes(values, bitmask, 16)
    torch.testing.assert_close(grad, 2 * (z.detach() @ codes.T) @ codes, rtol=1e-5, atol=1e-5)


def test_switched_off_falls_back_to_torch_ops(monkeypatch, fresh_native):
    monkeypatch.setenv(native.SWITCH_ENV, "0")
    assert not native.available() and "SPADI_AO_NATIVE_KERNELS=0" in native.unavailable_reason()
    assert select_kernel(torch.device("cpu"), torch.float32, 1) == "torch"
    values, bitmask = packed_codes(8, 12, 4, seed=2)
    z = torch.randn(1, 12, generator=torch.Generator().manual_seed(2))
    expected = dense_product(z, values, bitmask, None)  # float64: compare at float32 accuracy
    torch.testing.assert_close(
        cpu.multiply_codes(z, values, None, bitmask, None).double(), expected, rtol=1e-5, atol=1e-5
    )
    assert not list(fresh_native.glob("kernels/*.so"))


def test_failed_build_warns_once_and_falls_back(monkeypatch, fresh_native):
    if native.unavailable_reason() is not None:
        pytest.skip(f"no build is attempted here: {native.unavailable_reason()}")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(UserWarning, match="could not be built"):
        assert not native.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_kernel(torch.device("cpu"), torch.float32, 1) == "torch"


@needs_native
def test_build_is_cached_per_source_and_compiler(fresh_native):
    assert native.available()
    (built,) = fresh_native.glob("kernels/dictionary_decode-*.so")
    stamp = built.stat().st_mtime_ns
    native._kernels.cache_clear()
    assert native.available()
    assert [p.name for p in fresh_native.glob("kernels/*")] == [built.name]  # reused, no temporary left
    assert built.stat().st_mtime_ns == stamp
