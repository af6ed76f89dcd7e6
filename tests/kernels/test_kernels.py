"""``spadi_ao::dictionary_linear``: every route against the reference and an independent dense product.

The Triton kernels are checked on CPU tensors with the Triton interpreter. ``TRITON_INTERPRET=1`` must be
set before the kernels are decorated (when ``spadi_ao`` is imported), so ``test_triton_interpreter``
reruns this file's ``*_interpreted`` tests in a child pytest with the variable set; in the parent they
skip. To run them directly: ``TRITON_INTERPRET=1 pytest tests/kernels/test_kernels.py -k interpreted``.
GPU tests skip without CUDA; ``scripts/gpu_check.sh`` runs them with the kernel benchmark.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_interpreter import run_interpreted

from spadi_ao.format import pack_codes, unpack_codes
from spadi_ao.kernels import cpu, native, reference_dictionary_linear, select_kernel
from spadi_ao.kernels.reference import dequantize_dictionary, dequantize_values
from spadi_ao.kernels.selector import HAS_TRITON

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Max error relative to the largest output: both stages round to the compute dtype.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
ARG_NAMES = ("dictionary", "dictionary_scale", "values", "value_scale", "bitmask", "bias")


def make_layer(
    out_features: int,
    in_features: int,
    k: int,
    s: int,
    dtype: torch.dtype,
    *,
    int8_dictionary: bool = False,
    int8_values: bool = False,
    bias: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Optional[torch.Tensor]]:
    """Random packed weights in the stored format: int8 parts come with symmetric per-row scales."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(k, in_features, generator=g) / in_features**0.5
    indices = torch.rand(out_features, k, generator=g).argsort(dim=1)[:, :s]
    values, bitmask = pack_codes(indices, torch.randn(out_features, s, generator=g) / s**0.5, k)
    layer = {"dictionary_scale": None, "value_scale": None, "bitmask": bitmask}
    layer["dictionary"], layer["dictionary_scale"] = (
        _int8(dictionary) if int8_dictionary else (dictionary.to(dtype), None)
    )
    layer["values"], layer["value_scale"] = _int8(values) if int8_values else (values.to(dtype), None)
    layer["bias"] = torch.randn(out_features, generator=g).to(dtype) if bias else None
    return {name: None if t is None else t.to(device) for name, t in layer.items()}


def _int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = rows.abs().amax(dim=1).clamp_min(1e-8) / 127
    return (rows / scale.unsqueeze(1)).round().to(torch.int8), scale


def args(x: torch.Tensor, layer: dict) -> tuple:
    return (x, *(layer[name] for name in ARG_NAMES[:5]), layer["bias"])


def dense_output(x: torch.Tensor, layer: dict) -> torch.Tensor:
    """``x @ W_hat^T + b`` in float64 with ``W_hat = C @ D~`` built independently of any kernel."""
    atoms = dequantize_dictionary(layer["dictionary"], layer["dictionary_scale"], torch.float32).double()
    codes = dequantize_values(layer["values"], layer["value_scale"], torch.float32).double()
    w_hat = unpack_codes(codes, layer["bitmask"], atoms.shape[0]) @ atoms
    y = x.double() @ w_hat.T
    return y if layer["bias"] is None else y + layer["bias"].double()


def magnitude(x: torch.Tensor, layer: dict) -> float:
    """Largest ``sum |x| |D~| |C|``: rounding errors scale with the terms summed, not with a cancelled result."""
    atoms = dequantize_dictionary(layer["dictionary"], layer["dictionary_scale"], torch.float32).double().abs()
    codes = dequantize_values(layer["values"], layer["value_scale"], torch.float32).double().abs()
    terms = (x.double().abs() @ atoms.T) @ unpack_codes(codes, layer["bitmask"], atoms.shape[0]).T
    return terms.max().item() if terms.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> None:
    assert actual.shape == expected.shape
    scale = max(expected.double().abs().max().item() if expected.numel() else 0.0, scale or 0.0) + 1e-3
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3g} vs scale {scale:.3g} ({dtype})"


@st.composite
def cases(draw, max_tokens: int = 40, max_dim: int = 48):
    k = draw(st.integers(1, 40))
    return dict(
        out_features=draw(st.integers(1, max_dim)),
        in_features=draw(st.integers(1, max_dim)),
        k=k,
        s=draw(st.integers(1, k)),
        dtype=draw(st.sampled_from(DTYPES)),
        int8_dictionary=draw(st.booleans()),
        int8_values=draw(st.booleans()),
        bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        lead=draw(st.sampled_from([(), (1,), (2,)])),
        tokens=draw(st.integers(1, max_tokens)),
    )


def make_case(case: dict, device: str = "cpu") -> tuple[torch.Tensor, dict]:
    layer_args = {key: case[key] for key in ("int8_dictionary", "int8_values", "bias", "seed")}
    layer = make_layer(
        case["out_features"], case["in_features"], case["k"], case["s"], case["dtype"], device=device, **layer_args
    )
    g = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(*case["lead"], case["tokens"], case["in_features"], generator=g).to(
        device=device, dtype=case["dtype"]
    )
    return x, layer


# ---------------------------------------------------------------------------------------------- CPU


@given(case=cases())
@settings(max_examples=80, deadline=None)
def test_cpu_matches_reference_and_dense(case):
    x, layer = make_case(case)
    y = torch.ops.spadi_ao.dictionary_linear(*args(x, layer))
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], case["out_features"])
    # The reference rounds z to the compute dtype, the native decode kernel keeps it in float32: both err
    # by a rounding of the terms summed, which a cancelled result can fall far below.
    assert_close(y, reference_dictionary_linear(*args(x, layer)), case["dtype"], magnitude(x, layer))
    assert_close(y, dense_output(x, layer), case["dtype"], magnitude(x, layer))
    assert torch.equal(cpu.dictionary_linear(*args(x, layer)), y)


def test_prefill_reads_the_stored_tensors_as_they_are_now(monkeypatch):
    """Nothing derived from the codes is kept between calls: in-place edits and new tensors show at once."""
    monkeypatch.setattr(cpu, "SCRATCH_BYTES", 20 * 4 * 5)  # five rows a tile
    layer = make_layer(24, 16, 20, 7, torch.float32, int8_values=True)
    x = torch.randn(12, 16)  # prefill-sized: tiles of the codes, not the decode kernel
    y = torch.ops.spadi_ao.dictionary_linear(*args(x, layer))
    assert_close(y, dense_output(x, layer), torch.float32)
    layer["value_scale"].mul_(2)
    assert_close(torch.ops.spadi_ao.dictionary_linear(*args(x, layer)), 2 * y, torch.float32)
    layer["values"] = layer["values"].neg()  # a new tensor object
    assert_close(torch.ops.spadi_ao.dictionary_linear(*args(x, layer)), -2 * y, torch.float32)
    assert_close(torch.ops.spadi_ao.dictionary_linear(*args(x.double(), layer)), -2 * y.double(), torch.float32)


def test_inference_tensors():
    """Inference tensors (no version counter) run every route."""
    with torch.inference_mode():
        layer = make_layer(10, 8, 12, 3, torch.bfloat16, bias=True)
        x = torch.randn(4, 8, dtype=torch.bfloat16)
        for _ in range(2):
            assert_close(torch.ops.spadi_ao.dictionary_linear(*args(x, layer)), dense_output(x, layer), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    for flags in (dict(), dict(int8_dictionary=True, int8_values=True, bias=True)):
        layer = make_layer(12, 10, 9, 4, dtype, **flags)
        for x in (torch.randn(5, 10), torch.randn(2, 3, 10), torch.randn(3, 4, 10)):  # decode (native) and prefill
            torch.library.opcheck(torch.ops.spadi_ao.dictionary_linear.default, args(x.to(dtype), layer))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_fullgraph_matches_eager(dtype):
    layer = make_layer(20, 16, 12, 5, dtype, int8_dictionary=True, bias=True)

    def block(x: torch.Tensor) -> torch.Tensor:
        return F.silu(torch.ops.spadi_ao.dictionary_linear(*args(x, layer))) * 2

    compiled = torch.compile(block, fullgraph=True)
    for tokens in (3, 7, 11):  # the second shape recompiles with a dynamic token count
        x = torch.randn(2, tokens, 16).to(dtype)
        torch.testing.assert_close(compiled(x), block(x))


@pytest.mark.parametrize("quantized", [False, True])
def test_backward_matches_dense_autograd(quantized):
    """Gradients through the op == autograd through ``x @ (C D~)^T + b`` in float64 (int8 parts get none)."""
    layer = make_layer(9, 7, 10, 4, torch.float64, int8_dictionary=quantized, int8_values=quantized, bias=True, seed=3)
    leaves = {
        name: layer[name].clone().requires_grad_(True)
        for name in ("dictionary", "values", "bias")
        if layer[name].is_floating_point()
    }
    layer = {**layer, **leaves}
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 5, 9, dtype=torch.float64)
    grads = torch.autograd.grad(
        (torch.ops.spadi_ao.dictionary_linear(*args(x, layer)) * upstream).sum(), [x, *leaves.values()]
    )

    atoms = dequantize_dictionary(layer["dictionary"], layer["dictionary_scale"], torch.float64)
    values = dequantize_values(layer["values"], layer["value_scale"], torch.float64)
    mask = unpack_codes(torch.ones_like(values), layer["bitmask"], atoms.shape[0]).bool()
    codes = torch.zeros(mask.shape, dtype=torch.float64).masked_scatter(mask, values)
    expected = torch.autograd.grad(((x @ (codes @ atoms).T + layer["bias"]) * upstream).sum(), [x, *leaves.values()])
    assert set(leaves) == ({"bias"} if quantized else {"dictionary", "values", "bias"})
    for actual, reference in zip(grads, expected):
        torch.testing.assert_close(actual, reference)


def test_gradcheck():
    layer = make_layer(6, 5, 7, 3, torch.float64, bias=True, seed=4)
    inputs = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True)]
    inputs += [
        layer[name].requires_grad_(True) if name in ("dictionary", "values", "bias") else layer[name]
        for name in ARG_NAMES
    ]
    assert torch.autograd.gradcheck(torch.ops.spadi_ao.dictionary_linear, inputs)


def test_compile_with_grad_matches_eager():
    """Compiled without ``no_grad``, the graph carries the backward; input gradients match eager."""
    layer = make_layer(12, 10, 9, 4, torch.float32, bias=True, seed=5)

    def block(x):
        return F.gelu(torch.ops.spadi_ao.dictionary_linear(*args(x, layer)))

    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(4, 10, requires_grad=True)
    (eager_grad,) = torch.autograd.grad(block(x).square().sum(), x)
    (compiled_grad,) = torch.autograd.grad(compiled(x).square().sum(), x)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_select_kernel():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert select_kernel(torch.device("cpu"), dtype, 1) == ("native_decode" if native.available() else "torch")
    assert select_kernel(torch.device("cpu"), torch.float32, 17) == "torch"
    assert select_kernel(torch.device("cpu"), torch.float64, 1) == "torch"
    assert select_kernel(torch.device("cuda"), torch.float64, 1) == "torch"
    if HAS_TRITON:
        assert select_kernel(torch.device("cuda"), torch.bfloat16, 16) == "triton_decode"
        assert select_kernel(torch.device("cuda"), torch.bfloat16, 17) == "triton_prefill"


# ------------------------------------------------------------------------------ Triton interpreter


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_interpreter():
    """Runs the ``*_interpreted`` tests below in a child process with ``TRITON_INTERPRET=1``."""
    if INTERPRET:
        pytest.skip("this is the interpreted run already")
    run_interpreted(__file__)


@pytest.mark.skipif(
    not (INTERPRET and HAS_TRITON), reason="needs TRITON_INTERPRET=1 at import; see test_triton_interpreter"
)
@given(case=cases(max_tokens=24, max_dim=40), kernel=st.sampled_from(["triton_decode", "triton_prefill"]))
@settings(max_examples=50, deadline=None)
def test_triton_matches_reference_interpreted(case, kernel):
    from spadi_ao.kernels import triton_dictionary

    x, layer = make_case(case)
    y = triton_dictionary.dictionary_linear(*args(x, layer), kernel)
    assert y.dtype == x.dtype
    assert_close(y, reference_dictionary_linear(*args(x, layer)), case["dtype"])
    assert_close(y, dense_output(x, layer), case["dtype"], magnitude(x, layer))


# --------------------------------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA device and triton")


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 8, 16, 17, 128])
@pytest.mark.parametrize("int8", [False, True])
def test_triton_cuda_matches_reference(dtype, tokens, int8):
    """SmolLM2-like shape through the op, so ``select_kernel`` picks decode or prefill."""
    layer = make_layer(1536, 576, 317, 159, dtype, int8_dictionary=int8, int8_values=int8, bias=True, device="cuda")
    x = torch.randn(tokens, 576, device="cuda", dtype=dtype)
    y = torch.ops.spadi_ao.dictionary_linear(*args(x, layer))
    assert_close(y, reference_dictionary_linear(*args(x, layer)), dtype)
    assert_close(y.cpu(), dense_output(x.cpu(), {n: None if t is None else t.cpu() for n, t in layer.items()}), dtype)


@cuda_only
@given(case=cases(max_tokens=40, max_dim=48), kernel=st.sampled_from(["triton_decode", "triton_prefill"]))
@settings(max_examples=25, deadline=None)
def test_triton_cuda_random_shapes(case, kernel):
    from spadi_ao.kernels import triton_dictionary

    x, layer = make_case(case, device="cuda")
    y = triton_dictionary.dictionary_linear(*args(x, layer), kernel)
    assert_close(y, reference_dictionary_linear(*args(x, layer)), case["dtype"])


@cuda_only
def test_compile_fullgraph_cuda():
    layer = make_layer(256, 128, 96, 48, torch.bfloat16, int8_values=True, bias=True, device="cuda")

    def block(x: torch.Tensor) -> torch.Tensor:
        return F.silu(torch.ops.spadi_ao.dictionary_linear(*args(x, layer)))

    compiled = torch.compile(block, fullgraph=True)
    for tokens in (1, 64):
        x = torch.randn(tokens, 128, device="cuda", dtype=torch.bfloat16)
        assert_close(compiled(x), block(x), torch.bfloat16)
