"""A compressed layer holds its stored bytes and nothing more: no route that multiplies by the codes with many
tokens (native tiles, torch-ops tiles, a torchao-quantised dictionary, the backward pass) keeps a dense copy
of the codes after a call or builds one during it.

Two checks per route, on a layer whose dense codes (``out x k`` floats) are far larger than any activation:
every tensor the call allocates (seen by a dispatch mode) is at most activation- or parameter-sized, and no
tensor storage reachable from Python outlives the call except the result.
"""

from __future__ import annotations

import gc
import os
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from models import tiny_llama, token_batches
from test_kernels import args, assert_close, dense_output, magnitude, make_layer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchao.quantization import Int8DynamicActivationInt8WeightConfig
from triton_interpreter import run_interpreted

from spadi_ao import DictionaryConfig, DictionaryTensor, compression_stats, sparsify_dictionary_
from spadi_ao.format import unpack_codes, unpack_mask
from spadi_ao.integrations.torchao import quantize_dictionary
from spadi_ao.kernels import cpu, native, reference_dictionary_linear
from spadi_ao.kernels.op import dictionary_linear
from spadi_ao.kernels.reference import dequantize_values
from spadi_ao.kernels.selector import HAS_TRITON

OUT, IN, K, S, TOKENS = 600, 96, 512, 128, 64
SCRATCH = 16 * 2**10  # many small tiles, and a ragged last one
needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernel unavailable: {native.unavailable_reason()}"
)


class Allocations(TorchDispatchMode):
    """The bytes of every new storage an op returns (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(result):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return result


def live_storages() -> dict[int, int]:
    """Every plain tensor storage reachable from Python objects: address -> bytes."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return storages


def activation_bound(dtype: torch.dtype, *parameter_sizes: int) -> int:
    """The largest tensor a call may make: an activation (tokens x widest side) or a parameter-sized gradient."""
    return max(TOKENS * max(OUT, IN, K), *parameter_sizes, 0) * dtype.itemsize


def check_call(call: Callable[[], torch.Tensor], bound: int) -> torch.Tensor:
    """Run ``call`` twice: once to bound what it allocates, once to see that only its result survives."""
    with Allocations() as seen:
        call()
    before = live_storages()
    result = call()
    after = live_storages()
    kept = (
        set(after)
        - set(before)
        - {t.untyped_storage().data_ptr() for t in tree_leaves(result) if isinstance(t, torch.Tensor)}
    )
    assert not kept, f"{sum(after[p] for p in kept)} bytes outlive the call"
    dense_codes = OUT * K * 4
    assert seen.largest <= bound < dense_codes, (
        f"a {seen.largest}-byte tensor (bound {bound}, dense codes {dense_codes})"
    )
    return result


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(cpu, "SCRATCH_BYTES", SCRATCH, raising=False)


def warm_up(dtype: torch.dtype) -> None:
    """One call on other weights first, so one-time set-up (kernel build, torch's own caches) is not counted."""
    layer = make_layer(OUT, IN, K, S, dtype, seed=99)
    cpu.dictionary_linear(*args(torch.randn(TOKENS, IN).to(dtype), layer))


def test_cpu_torch_route(monkeypatch):
    monkeypatch.setattr(native, "available", lambda: False)
    for dtype in (torch.float32, torch.float64):
        warm_up(dtype)
        layer = make_layer(OUT, IN, K, S, dtype, int8_values=dtype == torch.float32, bias=True)
        x = torch.randn(TOKENS, IN, dtype=dtype)
        y = check_call(lambda: cpu.dictionary_linear(*args(x, layer)), activation_bound(dtype))
        torch.testing.assert_close(y, reference_dictionary_linear(*args(x, layer)))
        torch.testing.assert_close(y.double(), dense_output(x, layer), rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8_values", [False, True])
def test_native_route(dtype, int8_values):
    warm_up(dtype)
    layer = make_layer(OUT, IN, K, S, dtype, int8_values=int8_values, int8_dictionary=int8_values, bias=True)
    weight = DictionaryTensor(
        layer["dictionary"], layer["values"], layer["bitmask"], dtype, layer["dictionary_scale"], layer["value_scale"]
    )
    x = torch.randn(2, TOKENS // 2, IN).to(dtype)
    with torch.inference_mode():
        # What an eager layer calls (under a dispatch mode F.linear would hide it behind the op).
        bound = activation_bound(dtype, K * IN)  # an int8 dictionary is widened for BLAS, as a dense layer's would be
        y = check_call(lambda: cpu.dictionary_linear(*args(x, layer)), bound)
        assert torch.equal(check_call(lambda: F.linear(x, weight, layer["bias"]), bound), y)
    assert_close(y, reference_dictionary_linear(*args(x, layer)), dtype, magnitude(x, layer))
    assert_close(y, dense_output(x, layer), dtype, magnitude(x, layer))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "available", lambda: False)
        assert torch.equal(cpu.dictionary_linear(*args(x, layer)), y)  # torch-ops tiles: the same numbers


def _torchao_weight(seed: int) -> DictionaryTensor:
    layer = make_layer(OUT, IN, K, S, torch.float32, seed=seed)
    return quantize_dictionary(
        DictionaryTensor(layer["dictionary"], layer["values"], layer["bitmask"], torch.float32),
        Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),  # stays a torchao Int8Tensor
        values_dtype="int8",
    )


def test_torchao_int8_dictionary_route():
    weight, bias = _torchao_weight(seed=3), torch.randn(OUT)
    assert type(weight.dictionary) is not torch.Tensor and weight.values.dtype == torch.int8
    x = torch.randn(TOKENS, IN)
    with torch.no_grad():
        F.linear(torch.randn(TOKENS, IN), _torchao_weight(seed=4), bias)  # warm-up on other weights
        y = check_call(lambda: F.linear(x, weight, bias), activation_bound(torch.float32, K * IN))
        # torchao quantises x on the fly, so stage 1 is its own product; stage 2 is dense math on the codes.
        codes = unpack_codes(dequantize_values(weight.values, weight.value_scale, torch.float32), weight.bitmask, K)
        expected = F.linear(F.linear(x, weight.dictionary), codes, bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_backward():
    """Gradients through the op (x, dictionary, values, bias) against dense autograd, with the backward's
    allocations bounded like the forward's and nothing left after it."""
    layer = make_layer(OUT, IN, K, S, torch.float32, bias=True, seed=2)
    leaves = {name: layer[name].clone().requires_grad_(True) for name in ("dictionary", "values", "bias")}
    layer = {**layer, **leaves}
    x = torch.randn(TOKENS, IN, requires_grad=True)
    upstream = torch.randn(TOKENS, OUT)

    def gradients() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad((dictionary_linear(*args(x, layer)) * upstream).sum(), [x, *leaves.values()])

    gradients()  # warm-up
    grads = check_call(gradients, activation_bound(torch.float32, K * IN, OUT * S))
    codes = torch.zeros(OUT, K).masked_scatter(unpack_mask(layer["bitmask"], K), layer["values"])
    expected = torch.autograd.grad(
        ((x @ (codes @ layer["dictionary"]).T + layer["bias"]) * upstream).sum(), [x, *leaves.values()]
    )
    for actual, reference in zip(grads, expected):
        torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-4)


def _live_bytes() -> int:
    return sum(live_storages().values())


def _compressed_model():
    model = tiny_llama()
    config = DictionaryConfig(compression_ratio=0.3, iterations=1, atoms_per_step=4)
    sparsify_dictionary_(model, config, calibration=token_batches(2, 32), progress=False)
    return model


def test_a_compressed_model_holds_its_stored_bytes_after_prefill():
    """Whole model, default routes: a 64-token forward leaves the live tensor bytes where they were, and
    ``compression_stats`` reports resident bytes equal to the stored ones."""
    with torch.no_grad():
        _compressed_model()(token_batches(1, 64, seed=5)[0], use_cache=False)  # one-time set-up, other weights
        model = _compressed_model()
        prompt = token_batches(1, 64, seed=6)[0]
        before = _live_bytes()
        logits = model(prompt, use_cache=False).logits
        after = _live_bytes() - logits.untyped_storage().nbytes()
    assert after == before
    stats = compression_stats(model)
    assert stats["compressed_resident_bytes"] == stats["compressed_stored_bytes"]
    assert stats["model_resident_bytes"] == stats["model_stored_bytes"]


def test_resident_bytes_count_a_view_s_whole_buffer():
    """A weight whose values are a view into a larger buffer keeps the whole buffer: resident > stored."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False))
    layer = make_layer(8, 16, 12, 4, torch.float32)
    buffer = torch.zeros(64, 4)
    buffer[:8] = layer["values"]
    model[0].weight = torch.nn.Parameter(
        DictionaryTensor(layer["dictionary"], buffer[:8], layer["bitmask"], torch.float32), requires_grad=False
    )
    stats = compression_stats(model)
    assert stats["compressed_resident_bytes"] - stats["compressed_stored_bytes"] == (64 - 8) * 4 * 4


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(
    not (INTERPRET and HAS_TRITON), reason="needs TRITON_INTERPRET=1 at import; see test_triton_prefill"
)
def test_triton_prefill_interpreted():
    from spadi_ao.kernels import triton_dictionary

    layer = make_layer(OUT, IN, K, S, torch.float32, int8_values=True, bias=True)
    x = torch.randn(TOKENS, IN)
    triton_dictionary.dictionary_linear(
        *args(torch.randn(TOKENS, IN), make_layer(OUT, IN, K, S, torch.float32, seed=9)), "triton_prefill"
    )
    y = check_call(
        lambda: triton_dictionary.dictionary_linear(*args(x, layer), "triton_prefill"), activation_bound(torch.float32)
    )
    assert_close(y, reference_dictionary_linear(*args(x, layer)), torch.float32, magnitude(x, layer))


def test_triton_prefill():
    """Runs ``test_triton_prefill_interpreted`` in a child process with ``TRITON_INTERPRET=1`` (the Triton
    kernels rebuild each tile of the codes in registers and keep nothing between calls)."""
    if INTERPRET or not HAS_TRITON:
        pytest.skip("this is the interpreted run already" if INTERPRET else "triton is not installed")
    run_interpreted(__file__)
