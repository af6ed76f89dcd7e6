"""CoSpaDi composed with torchao quantisation: numerics, honest bytes, both quantize_ orders, compile, save/load.

SQNR thresholds (``10 log10(|y|^2 / |y - y_q|^2)`` of a layer's output, measured on a 96x128 layer at CR 0.3):
int8 parts add ~40 dB of quantisation noise and bf16 values ~55 dB, so against the unquantised compressed
layer they must stay above 35 dB (int8) and 45 dB (bf16); int4 groups of 32 give ~21 dB, so above 18 dB.
Against the dense layer, int8 variants lose at most 0.5 dB of the compressed layer's own SQNR (~26.5 dB).
"""

import copy
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from models import tiny_llama, token_batches
from torchao.quantization import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8Tensor,
    Int8WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    PerGroup,
    PerRow,
    quantize_,
)

from spadi_ao import DictionaryConfig, DictionaryTensor, LowRankConfig, quantize_dictionary_, sparsify_dictionary_
from spadi_ao.format import unpack_codes
from spadi_ao.grouping import storage_key
from spadi_ao.layer import compress_weight
from spadi_ao.serialization import (
    CheckpointError,
    flatten_state_dict,
    load_compressed,
    save_compressed,
    unflatten_state_dict,
)
from spadi_ao.tensor import stored_bytes

INT4 = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
INT8_DYNAMIC = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
INT8 = Int8WeightOnlyConfig(set_inductor_config=False)

# name -> (DictionaryConfig fields, min SQNR vs the unquantised compressed layer)
VARIANTS = {
    "int8-dictionary": (dict(dictionary_quantization=INT8), 35.0),
    "int8-values": (dict(values_dtype="int8"), 35.0),
    "int8-both": (dict(dictionary_quantization=INT8, values_dtype="int8"), 35.0),
    "bf16-values": (dict(values_dtype="bfloat16"), 45.0),
    "int8-dynamic": (dict(dictionary_quantization=INT8_DYNAMIC, values_dtype="int8"), 35.0),
    "int4-dictionary": (dict(dictionary_quantization=INT4, values_dtype="int8"), 18.0),
}
MIXED = {  # both linear paths in one model: the fused op and torchao-quantised dictionaries
    r"q_proj|k_proj": VARIANTS["int8-both"][0],
    r"up_proj": VARIANTS["int4-dictionary"][0],
    r"down_proj": VARIANTS["int8-dynamic"][0],
}


def sqnr(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - approximation).pow(2).sum()))


@pytest.fixture(scope="module")
def layer_problem():
    torch.manual_seed(0)
    weight = (torch.randn(96, 24) @ torch.randn(24, 128)) / 5 + 0.1 * torch.randn(96, 128)
    inputs = torch.randn(512, 128) @ (torch.eye(128) + 0.03 * torch.randn(128, 128))
    return weight, inputs.T.double() @ inputs.double(), inputs[:64]


def _dense_weight(weight: DictionaryTensor) -> torch.Tensor:
    """``C^T D~`` from the stored parts, scaled by hand (torchao dequantises its own dictionaries)."""
    if hasattr(weight.dictionary, "qdata"):
        atoms = weight.dictionary.dequantize()
    elif weight.dictionary_scale is not None:
        atoms = weight.dictionary.float() * weight.dictionary_scale[:, None]
    else:
        atoms = weight.dictionary.float()
    values = (
        weight.values.float() if weight.value_scale is None else weight.values.float() * weight.value_scale[:, None]
    )
    return unpack_codes(values, weight.bitmask, weight.num_atoms) @ atoms


def _compress_layer(layer_problem, **fields):
    weight, gram, _ = layer_problem
    return compress_weight("layer", weight, gram, DictionaryConfig(compression_ratio=0.3, iterations=2, **fields))


def _compressed_model(**fields):
    model = tiny_llama()
    config = DictionaryConfig(compression_ratio=0.3, iterations=1, **fields)
    sparsify_dictionary_(model, config, calibration=token_batches(4, 32), progress=False)
    return model


@pytest.fixture(scope="module")
def plain_model():
    return _compressed_model()


@pytest.fixture(scope="module")
def mixed_model():
    return _compressed_model(
        layer_overrides=MIXED, grouping=None
    )  # q/k and v quantised differently: no shared dictionary


def _lists_as_tuples(attributes: dict) -> dict:
    return {
        key: tuple(value) if isinstance(value, list) else value for key, value in attributes.items()
    }  # JSON has no tuples


def _assert_same_parts(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same class and bit-identical inner tensors, recursing into torchao-quantised dictionaries."""
    assert type(actual) is type(expected)
    if type(expected) is torch.Tensor:
        assert torch.equal(actual, expected)
        return
    names, attributes = expected.__tensor_flatten__()
    actual_names, actual_attributes = actual.__tensor_flatten__()
    assert actual_names == names
    assert _lists_as_tuples(actual_attributes) == _lists_as_tuples(attributes)
    for name in names:
        _assert_same_parts(getattr(actual, name), getattr(expected, name))


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(24).unsqueeze(0)).logits


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(dictionary_quantization=Int4WeightOnlyConfig()), "dictionary_quantization must be None or a torchao"),
        (dict(dictionary_quantization="int8"), "dictionary_quantization must be None or a torchao"),
        (dict(values_dtype="float8"), "values_dtype must be None"),
        (dict(values_dtype=torch.int8), "values_dtype must be None"),
        (dict(layer_overrides={"up_proj": {"values_dtype": "int4"}}), "values_dtype must be None"),
    ],
)
def test_config_rejects_bad_quantization_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        DictionaryConfig(**fields)


def test_group_size_must_divide_in_features(layer_problem):
    with pytest.raises(ValueError, match="group_size=48 must divide the layer's in_features=128"):
        _compress_layer(
            layer_problem,
            dictionary_quantization=IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(48)),
        )


# --------------------------------------------------------------------------------------------- numerics


def test_int8_dictionary_matches_torchaos_int8_tensor(layer_problem):
    base, _ = _compress_layer(layer_problem)
    quantized, _ = _compress_layer(layer_problem, dictionary_quantization=INT8)
    reference = Int8Tensor.from_hp(base.dictionary, granularity=PerRow())
    assert quantized.dictionary.dtype == torch.int8 and quantized.dictionary_scale.shape == (base.num_atoms,)
    assert torch.equal(quantized.dictionary, reference.qdata)
    assert torch.equal(quantized.dictionary_scale, reference.scale.squeeze(1))
    assert torch.equal(quantized.values, base.values) and torch.equal(quantized.bitmask, base.bitmask)


def test_int8_values_round_to_the_nearest_step(layer_problem):
    base, _ = _compress_layer(layer_problem)
    quantized, _ = _compress_layer(layer_problem, values_dtype="int8")
    step = base.values.abs().amax(dim=1) / 127.5  # torchao's symmetric int8 range is [-128, 127]
    assert torch.allclose(quantized.value_scale, step)
    error = (quantized.values.float() * quantized.value_scale[:, None] - base.values).abs()
    assert bool((error <= step[:, None] / 2 * (1 + 1e-4)).all())  # ties at +-127.5 steps round to the edge


@pytest.mark.parametrize("name", VARIANTS)
def test_composed_layer_sqnr(layer_problem, name):
    fields, threshold = VARIANTS[name]
    weight, _, x = layer_problem
    base, base_report = _compress_layer(layer_problem)
    composed, report = _compress_layer(layer_problem, **fields)
    dense_out, base_out, composed_out = F.linear(x, weight), F.linear(x, base), F.linear(x, composed)
    assert torch.equal(composed.bitmask, base.bitmask)  # quantised after the solve: same supports
    assert sqnr(base_out, composed_out) >= threshold
    if threshold >= 35.0:
        assert sqnr(dense_out, composed_out) >= sqnr(dense_out, base_out) - 0.5
    # the kernels compute the product of the dequantised parts (int8 dynamic also quantises x per token)
    reference = x @ _dense_weight(composed).T
    assert sqnr(reference, composed_out) >= (30.0 if name == "int8-dynamic" else 80.0)
    assert report.stored_bytes == composed.stored_bytes() < base_report.stored_bytes
    assert report.compression_ratio == pytest.approx(1 - composed.stored_bytes() / (96 * 128 * 4))


def test_stored_bytes_count_what_is_held(layer_problem):
    base, _ = _compress_layer(layer_problem)
    k, s, out, inp, mask = base.num_atoms, base.nonzeros_per_row, 96, 128, base.bitmask.shape[1]
    assert base.stored_bytes() == 4 * k * inp + 4 * out * s + out * mask
    int8, _ = _compress_layer(layer_problem, **VARIANTS["int8-both"][0])
    assert int8.stored_bytes() == (k * inp + 4 * k) + (out * s + 4 * out) + out * mask
    bf16, _ = _compress_layer(layer_problem, values_dtype="bfloat16")
    assert bf16.stored_bytes() == 4 * k * inp + 2 * out * s + out * mask
    int4, _ = _compress_layer(layer_problem, dictionary_quantization=INT4)
    assert isinstance(int4.dictionary, IntxUnpackedToInt8Tensor)
    groups = inp // 32  # int4 codes sit in int8 containers: 1 byte each, plus fp32 scale and int8 zero per group
    assert int4.stored_bytes() == (k * inp + 4 * k * groups + k * groups) + 4 * out * s + out * mask


def test_post_hoc_quantization_equals_the_config_route():
    direct = _compressed_model(**VARIANTS["int8-both"][0])
    later = _compressed_model()
    assert quantize_dictionary_(later, INT8, values_dtype="int8") == 14
    for key, value in direct.state_dict().items():
        _assert_same_parts(later.state_dict()[key], value)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: the dictionary is already quantised"):
        quantize_dictionary_(later, INT4)
    with pytest.raises(ValueError, match="pass dictionary_quantization"):
        quantize_dictionary_(later)


# ------------------------------------------------------------------------------------ quantize_ both orders


def test_quantize_after_sparsify_quantizes_the_dictionaries(plain_model):
    for config, kind in ((INT8, torch.Tensor), (INT8_DYNAMIC, Int8Tensor), (INT4, IntxUnpackedToInt8Tensor)):
        model = copy.deepcopy(plain_model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quantize_(model, config)
        weight = model.model.layers[0].mlp.up_proj.weight
        assert isinstance(weight, DictionaryTensor) and type(weight.dictionary) is kind
        assert torch.equal(weight.values, plain_model.model.layers[0].mlp.up_proj.weight.values)
        assert sqnr(_logits(plain_model), _logits(model)) > (15.0 if config is INT4 else 30.0)


def _compressed_linear(module, fqn):
    return isinstance(module, torch.nn.Linear) and isinstance(module.weight, DictionaryTensor)


def test_quantize_leaves_unsupported_cases_with_a_warning(plain_model):
    model = copy.deepcopy(plain_model)
    original = model.model.layers[0].mlp.up_proj.weight
    with pytest.warns(UserWarning, match="Int4WeightOnlyConfig is not supported for a dictionary"):
        quantize_(model, Int4WeightOnlyConfig(group_size=32), filter_fn=_compressed_linear)
    assert model.model.layers[0].mlp.up_proj.weight is original
    quantize_(model, INT8, filter_fn=_compressed_linear)
    with pytest.warns(UserWarning, match="its dictionary is already quantised"):
        quantize_(model, INT4, filter_fn=_compressed_linear)
    assert model.model.layers[0].mlp.up_proj.weight.dictionary.dtype == torch.int8
    low_rank = tiny_llama()
    sparsify_dictionary_(
        low_rank, LowRankConfig(compression_ratio=0.3), calibration=token_batches(2, 16), progress=False
    )
    with pytest.warns(UserWarning, match="does not quantise LowRankTensor factors"):
        quantize_(low_rank, INT8)


@pytest.mark.parametrize("config", [INT8, INT4], ids=["int8", "int4"])
def test_grouped_layers_keep_sharing_their_quantised_dictionary(config):
    grouped = _compressed_model(grouping="inputs")
    per_module = copy.deepcopy(grouped)
    quantize_(per_module, config, filter_fn=_compressed_linear)  # torchao calls the handler once per Linear
    attention = per_module.model.layers[0].self_attn
    assert storage_key(attention.q_proj.weight.dictionary) == storage_key(attention.v_proj.weight.dictionary)
    quantize_dictionary_(grouped, config)
    attention = grouped.model.layers[0].self_attn
    assert attention.q_proj.weight.dictionary is attention.v_proj.weight.dictionary
    assert torch.equal(_logits(grouped), _logits(per_module))


def test_quantize_still_handles_dense_linears():
    linear = torch.nn.Linear(64, 32)
    quantize_(linear, INT8)
    assert isinstance(linear.weight, Int8Tensor)
    assert stored_bytes(linear.weight) == 32 * 64 + 4 * 32 + 32  # int8 codes, fp32 scale and int8 zero point per row


def test_sparsify_after_torchao_quantization_raises():
    model = tiny_llama()
    quantize_(model, INT8)
    with pytest.raises(ValueError, match=r"is a Int8Tensor \(already quantised\?\).*compress first, then quantise"):
        sparsify_dictionary_(
            model, DictionaryConfig(compression_ratio=0.3), calibration=token_batches(1, 16), progress=False
        )


# ------------------------------------------------------------------------------------------------ compile


@pytest.mark.parametrize("name", ["int8-both", "int8-dynamic", "int4-dictionary"])
def test_compile_traces_fullgraph(name):
    """Dynamo + AOTAutograd through both linear paths (aot_eager: no codegen, so every variant stays fast)."""
    model = _compressed_model(**VARIANTS[name][0])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(torch.arange(24).unsqueeze(0)).logits, _logits(model), atol=1e-5)


def test_inductor_compile_matches_eager(mixed_model):
    """One Inductor build of a model mixing the fused int8 op and torchao-quantised dictionaries."""
    torch._dynamo.reset()
    compiled = torch.compile(mixed_model, fullgraph=True)
    ids = torch.arange(24).unsqueeze(0)
    with torch.inference_mode():
        # int8 dynamic activation quantisation may round a value differently once Inductor fuses it
        assert torch.allclose(compiled(ids).logits, mixed_model(ids).logits, atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_roundtrip_is_bit_exact(name):
    model = _compressed_model(**VARIANTS[name][0])
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    with init_empty_weights(include_buffers=False):
        fresh = tiny_llama()
    fresh.load_state_dict(state, assign=True)
    assert torch.equal(_logits(fresh), _logits(model))


@pytest.mark.parametrize("name", VARIANTS)
def test_safetensors_roundtrip_is_bit_exact(name, tmp_path):
    model = _compressed_model(**VARIANTS[name][0])
    save_compressed(model, tmp_path / "out")
    loaded, _ = load_compressed(tmp_path / "out")
    for key, value in model.state_dict().items():
        _assert_same_parts(loaded.state_dict()[key], value)
    assert torch.equal(_logits(loaded), _logits(model))


def test_fresh_process_weights_only_load(mixed_model, tmp_path):
    torch.save(mixed_model.state_dict(), tmp_path / "state.pt")
    torch.save(_logits(mixed_model), tmp_path / "expected.pt")
    script = f"""
import sys, torch, spadi_ao
from accelerate import init_empty_weights
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from models import tiny_llama
state = torch.load({str(tmp_path / "state.pt")!r}, weights_only=True)
with init_empty_weights(include_buffers=False):
    model = tiny_llama()
model.load_state_dict(state, assign=True)
assert type(model.model.layers[0].mlp.up_proj.weight.dictionary).__name__ == "IntxUnpackedToInt8Tensor"
with torch.no_grad():
    assert torch.equal(model(torch.arange(24).unsqueeze(0)).logits, torch.load({str(tmp_path / "expected.pt")!r}))
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def _flat(model):
    return flatten_state_dict({"w": model.model.layers[0].mlp.up_proj.weight})


def test_corrupted_or_mismatched_manifest_raises(mixed_model):
    tensors, manifest = _flat(mixed_model)
    assert unflatten_state_dict(tensors, manifest)["w"].dictionary.qdata.dtype == torch.int8

    broken = json.loads(json.dumps(manifest))
    broken["subclasses"]["w"]["tensors"]["values"]["shape"] = [1, 1]
    with pytest.raises(
        CheckpointError, match=r"w.values: stored shape \[160, \d+\] does not match the recorded layout \[1, 1\]"
    ):
        unflatten_state_dict(tensors, broken)

    with pytest.raises(CheckpointError, match="lacks inner tensor w.dictionary.scale"):
        unflatten_state_dict({k: v for k, v in tensors.items() if k != "w.dictionary.scale"}, manifest)

    broken = json.loads(json.dumps(manifest))
    broken["subclasses"]["w"]["nested"]["dictionary"] = '{"_type": "Int9Tensor", "_data": {}}'
    with pytest.raises(CheckpointError, match="w.dictionary: cannot rebuild its torchao tensor"):
        unflatten_state_dict(tensors, broken)

    wrong_dtype = dict(tensors, **{"w.values": tensors["w.values"].float()})
    with pytest.raises(CheckpointError, match="w.values: stored dtype float32 does not match the recorded int8"):
        unflatten_state_dict(wrong_dtype, manifest)


def test_version_1_manifests_still_load(plain_model):
    tensors, manifest = _flat(plain_model)
    entry = manifest["subclasses"]["w"]
    legacy_entry = {
        "type": entry["type"],
        "dtype": entry["dtype"],
        "shape": entry["shape"],
        "tensors": list(entry["tensors"]),
    }
    legacy = {"format_version": 1, "aliases": {}, "subclasses": {"w": legacy_entry}}
    assert torch.equal(unflatten_state_dict(tensors, legacy)["w"].values, tensors["w.values"])


def test_truncated_safetensors_file_raises(plain_model, tmp_path):
    path = save_compressed(plain_model, tmp_path / "out")
    file = path / "spadi_model.safetensors"
    file.write_bytes(file.read_bytes()[:64])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_compressed(path)
