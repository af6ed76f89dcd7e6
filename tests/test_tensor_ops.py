"""Tensor behaviour of compressed weights as torchao tensors have it, checked against dequantize() (dense math)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from models import tiny_llama, token_batches
from tensor_checks import check_slice_and_copy_like_vllm
from torch import nn

from spadi_ao import (
    DictionaryConfig,
    DictionaryTensor,
    LowRankConfig,
    LowRankTensor,
    compression_stats,
    sparsify_dictionary_,
)

CONFIGS = {
    "dictionary": DictionaryConfig(compression_ratio=0.3),
    "int8-values": DictionaryConfig(compression_ratio=0.3, values_dtype="int8"),
    "bf16-values": DictionaryConfig(compression_ratio=0.3, values_dtype="bfloat16"),
    "low-rank": LowRankConfig(compression_ratio=0.3),
}


def _linear(config, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Sequential(nn.Linear(64, 48, bias=False))
    sparsify_dictionary_(layer, config, progress=False)
    return layer[0]


@pytest.fixture(params=list(CONFIGS))
def config(request):
    return CONFIGS[request.param]


@pytest.mark.parametrize(
    "convert", [lambda w: w.to(torch.bfloat16), lambda w: w.half(), lambda w: w.to(device="cpu", dtype=torch.bfloat16)]
)
def test_dtype_casts_convert_float_parts_and_keep_the_rest(config, convert):
    weight = _linear(config).weight
    cast = convert(weight)
    assert type(cast) is type(weight) and cast.dtype in (torch.bfloat16, torch.float16)
    if isinstance(cast, DictionaryTensor):
        assert cast.dictionary.dtype == cast.dtype and torch.equal(cast.bitmask, weight.bitmask)
        if (
            weight.values.dtype != weight.dtype
        ):  # int8 (with scales) or bfloat16 values: a format of their own, as stored
            assert torch.equal(cast.values, weight.values) and cast.values.dtype == weight.values.dtype
            assert cast.value_scale is None or torch.equal(cast.value_scale, weight.value_scale)
        else:
            assert cast.values.dtype == cast.dtype
    else:
        assert cast.down.dtype == cast.up.dtype == cast.dtype
    torch.testing.assert_close(cast.dequantize(torch.float32), weight.dequantize(), rtol=2e-2, atol=2e-2)
    x = torch.randn(5, 64).to(cast.dtype)
    torch.testing.assert_close(
        F.linear(x, cast).float(), x.float() @ cast.dequantize(torch.float32).T, rtol=2e-2, atol=2e-2
    )


def test_model_to_bfloat16_converts_compressed_weights():
    model = tiny_llama()
    sparsify_dictionary_(
        model, DictionaryConfig(compression_ratio=0.3), calibration=token_batches(2, 16), progress=False
    )
    model.to(torch.bfloat16)
    weight = model.model.layers[0].mlp.up_proj.weight
    assert weight.dtype == weight.dictionary.dtype == weight.values.dtype == torch.bfloat16
    assert model(torch.arange(8).unsqueeze(0)).logits.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "take, dense",
    [
        (lambda w: w[:8], lambda d: d[:8]),
        (lambda w: w[5:17], lambda d: d[5:17]),
        (lambda w: w.narrow(0, 16, 24), lambda d: d.narrow(0, 16, 24)),
        (lambda w: w.narrow(1, 8, 40), lambda d: d.narrow(1, 8, 40)),
        (lambda w: w[:, 3:9], lambda d: d[:, 3:9]),
        (lambda w: w[-8:], lambda d: d[-8:]),
    ],
)
def test_slices_match_the_dense_slice(config, take, dense):
    weight = _linear(config).weight
    part = take(weight)
    assert type(part) is type(weight)
    torch.testing.assert_close(part.dequantize(), dense(weight.dequantize()), rtol=1e-6, atol=1e-6)


def test_row_slices_keep_the_dictionary_and_view_the_codes():
    weight = _linear(CONFIGS["int8-values"]).weight
    rows = weight[8:24]
    assert rows.dictionary is weight.dictionary
    assert rows.values.untyped_storage().data_ptr() == weight.values.untyped_storage().data_ptr()
    assert torch.equal(rows.value_scale, weight.value_scale[8:24]) and torch.equal(rows.bitmask, weight.bitmask[8:24])
    columns = weight.narrow(1, 16, 16)
    assert columns.values is weight.values and torch.equal(columns.dictionary, weight.dictionary[:, 16:32])


@pytest.mark.parametrize("dim", [0, 1])
def test_slice_and_copy_like_vllm(config, dim):
    check_slice_and_copy_like_vllm(lambda seed: _linear(config, seed), dim)


@pytest.mark.parametrize(
    "op",
    [
        torch.ops.aten.detach.default,
        torch.ops.aten.alias.default,
        torch.ops.aten.clone.default,
        lambda w: torch.ops.aten._to_copy.default(w, dtype=torch.float32),
    ],
)
def test_detach_alias_clone_to_copy_keep_the_weight(config, op):
    weight = _linear(config).weight
    result = op(weight)
    assert type(result) is type(weight)
    assert torch.equal(result.dequantize(), weight.dequantize())


def _part_shapes(weight):
    return [getattr(weight, name).shape for name in weight.__tensor_flatten__()[0]]


def test_meta_then_to_empty(config):
    layer = _linear(config)
    shapes = _part_shapes(layer.weight)
    layer.to("meta")
    assert layer.weight.is_meta
    layer.to_empty(device="cpu")
    assert type(layer.weight) in (DictionaryTensor, LowRankTensor) and layer.weight.device.type == "cpu"
    assert _part_shapes(layer.weight) == shapes
    source = _linear(config).weight
    with torch.no_grad():  # what a loader does next: fill the empty weight from the checkpoint
        layer.weight.copy_(source)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), x @ source.dequantize().T, rtol=1e-5, atol=1e-5)


def test_short_repr_and_print_model():
    model = tiny_llama()
    sparsify_dictionary_(
        model,
        DictionaryConfig(compression_ratio=0.3, values_dtype="int8"),
        calibration=token_batches(2, 16),
        progress=False,
    )
    weight = model.model.layers[0].self_attn.q_proj.weight
    text = repr(weight)
    assert len(text) < 200 and "values" in text
    assert (
        f"k={weight.num_atoms}, s={weight.nonzeros_per_row}" in text and f"stored_bytes={weight.stored_bytes()}" in text
    )
    assert "values=int8+scale" in text
    printed = str(model)
    assert printed.count("weight=DictionaryTensor(") >= 7 and len(printed) < 6000  # identical blocks print once
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the description survives pickling and copying
    buffer.seek(0)
    assert str(torch.load(buffer, weights_only=False)) == printed == str(copy.deepcopy(model))
    low_rank = _linear(CONFIGS["low-rank"]).weight
    assert (
        repr(low_rank)
        == f"LowRankTensor(shape=(48, 64), rank={low_rank.rank}, dtype=float32, stored_bytes={low_rank.stored_bytes()})"
    )


def test_memory_footprint_counts_stored_bytes():
    shared = tiny_llama()  # the default shares dictionaries: each is counted once
    sparsify_dictionary_(
        shared, DictionaryConfig(compression_ratio=0.3), calibration=token_batches(2, 16), progress=False
    )
    assert shared.get_memory_footprint() == compression_stats(shared)["model_stored_bytes"]
    model = tiny_llama()
    dense = model.get_memory_footprint()
    config = DictionaryConfig(compression_ratio=0.3, grouping=None)
    sparsify_dictionary_(model, config, calibration=token_batches(2, 16), progress=False)
    removed = sum(
        m.weight.shape[0] * m.weight.shape[1] * 4 - m.weight.stored_bytes()
        for m in model.modules()
        if isinstance(m, nn.Linear) and isinstance(m.weight, DictionaryTensor)
    )
    assert model.get_memory_footprint() == dense - removed
    assert model.get_memory_footprint() == compression_stats(model)["model_stored_bytes"]
