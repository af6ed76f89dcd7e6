import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spadi_ao import DictionaryTensor, LowRankTensor
from spadi_ao.format import pack_codes, unpack_codes


def _random_dictionary_tensor(out_features, in_features, k, s, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(k, in_features, generator=generator).to(dtype)
    indices = torch.stack([torch.randperm(k, generator=generator)[:s] for _ in range(out_features)])
    values, bitmask = pack_codes(indices, torch.randn(out_features, s, generator=generator).to(dtype), k)
    return DictionaryTensor(atoms, values, bitmask, dtype)


@given(out_features=st.integers(1, 20), in_features=st.integers(1, 20), k=st.integers(1, 40), data=st.data())
@settings(max_examples=50, deadline=None)
def test_pack_unpack_roundtrip(out_features, in_features, k, data):
    s = data.draw(st.integers(1, k))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    indices = torch.stack([torch.randperm(k, generator=generator)[:s] for _ in range(out_features)])
    values = torch.randn(out_features, s, generator=generator)
    packed_values, bitmask = pack_codes(indices, values, k)
    assert bitmask.shape == (out_features, (k + 7) // 8) and bitmask.dtype == torch.uint8
    expected = torch.zeros(out_features, k).scatter_(1, indices, values)
    assert torch.equal(unpack_codes(packed_values, bitmask, k), expected)


def test_pack_codes_block_by_block_matches_one_block(monkeypatch):
    """Rows packed a few at a time give the same bytes; a bad row in a later block is still refused."""
    generator = torch.Generator().manual_seed(3)
    indices = torch.stack([torch.randperm(21, generator=generator)[:6] for _ in range(40)])
    values = torch.randn(40, 6, generator=generator)
    whole = pack_codes(indices, values, 21)
    monkeypatch.setattr("spadi_ao.format.BLOCK_ELEMENTS", 50)  # 2 rows a block
    blocked = pack_codes(indices, values, 21)
    assert all(torch.equal(a, b) for a, b in zip(whole, blocked))
    indices[37, 1] = indices[37, 0]
    with pytest.raises(ValueError, match="distinct"):
        pack_codes(indices, values, 21)


def test_logical_shape_dtype_and_dequantize():
    weight = _random_dictionary_tensor(12, 10, 8, 3)
    assert weight.shape == (12, 10) and weight.dtype == torch.float32
    dense = unpack_codes(weight.values, weight.bitmask, 8) @ weight.dictionary
    assert torch.allclose(weight.dequantize(), dense)
    assert weight.stored_bytes() == 8 * 10 * 4 + 12 * 3 * 4 + 12 * 1


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_dense(bias):
    linear = torch.nn.Linear(10, 12, bias=bias)
    weight = _random_dictionary_tensor(12, 10, 8, 3)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    x = torch.randn(2, 5, 10)
    expected = F.linear(x, weight.dequantize(), linear.bias)
    assert torch.allclose(linear(x), expected, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _random_dictionary_tensor(12, 10, 8, 3),
        lambda: LowRankTensor(torch.randn(3, 10), torch.randn(12, 3), torch.float32),
    ],
)
@pytest.mark.parametrize("inference", [True, False])
def test_linear_takes_its_arguments_by_name_too(make, inference):
    """``F.linear(x, w, bias=b)`` once dropped the bias and ``F.linear(input=x, weight=w)`` raised IndexError."""
    weight, bias, x = make(), torch.randn(12), torch.randn(2, 10)
    expected = F.linear(x, weight.dequantize(), bias)
    with torch.inference_mode(inference):
        for y in (
            F.linear(x, weight, bias=bias),
            F.linear(input=x, weight=weight, bias=bias),
            F.linear(x, weight=weight, bias=bias),
        ):
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            F.linear(input=x, weight=weight), F.linear(x, weight.dequantize()), rtol=1e-5, atol=1e-5
        )


def test_eager_cpu_inference_skips_the_op_dispatch_with_identical_output(monkeypatch):
    from spadi_ao.kernels import cpu

    weight, bias = _random_dictionary_tensor(12, 10, 8, 3), torch.randn(12)
    x = torch.randn(2, 5, 10)
    via_op = torch.ops.spadi_ao.dictionary_linear(x, weight.dictionary, None, weight.values, None, weight.bitmask, bias)
    calls = []
    kernel = cpu.dictionary_linear
    monkeypatch.setattr(cpu, "dictionary_linear", lambda *args: calls.append(1) or kernel(*args))
    with torch.no_grad():
        assert torch.equal(F.linear(x, weight, bias), via_op)
    assert calls == [1]
    x.requires_grad_(True)
    through_op = F.linear(x, weight, bias)  # gradients needed: the op and its autograd formula
    assert calls == [1] and through_op.grad_fn is not None
    assert torch.equal(through_op.detach(), via_op)


def test_low_rank_linear_matches_dense():
    down, up = torch.randn(3, 10), torch.randn(12, 3)
    weight = LowRankTensor(down, up, torch.float32)
    x = torch.randn(4, 10)
    assert weight.shape == (12, 10)
    assert torch.allclose(F.linear(x, weight), x @ (up @ down).T, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _random_dictionary_tensor(12, 10, 8, 3),
        lambda: LowRankTensor(torch.randn(3, 10), torch.randn(12, 3), torch.float32),
    ],
)
def test_state_dict_roundtrip_is_bit_exact_with_weights_only(make):
    linear = torch.nn.Linear(10, 12)
    linear.weight = torch.nn.Parameter(make(), requires_grad=False)
    buffer = io.BytesIO()
    torch.save(linear.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    with torch.device("meta"):
        fresh = torch.nn.Linear(10, 12)
    fresh.load_state_dict(state, assign=True)
    x = torch.randn(3, 10)
    assert type(fresh.weight) is type(linear.weight)
    for name in linear.weight.__tensor_flatten__()[0]:
        assert torch.equal(getattr(fresh.weight, name), getattr(linear.weight, name))
    assert torch.equal(fresh(x), linear(x))


def test_fresh_process_weights_only_load(tmp_path):
    linear = torch.nn.Linear(10, 12)
    linear.weight = torch.nn.Parameter(_random_dictionary_tensor(12, 10, 8, 3), requires_grad=False)
    torch.save(linear.state_dict(), tmp_path / "state.pt")
    torch.save(linear(torch.ones(1, 10)).detach(), tmp_path / "expected.pt")
    script = f"""
import torch, spadi_ao
state = torch.load({str(tmp_path / "state.pt")!r}, weights_only=True)
with torch.device("meta"):
    linear = torch.nn.Linear(10, 12)
linear.load_state_dict(state, assign=True)
assert type(linear.weight).__name__ == "DictionaryTensor"
assert torch.equal(linear(torch.ones(1, 10)), torch.load({str(tmp_path / "expected.pt")!r}))
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def test_to_and_clone_keep_the_subclass():
    weight = _random_dictionary_tensor(6, 5, 4, 2)
    moved = weight.to("cpu")
    assert isinstance(moved, DictionaryTensor)
    cloned = weight.clone()
    assert isinstance(cloned, DictionaryTensor) and torch.equal(cloned.values, weight.values)
