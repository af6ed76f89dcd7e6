"""transformers save_pretrained / from_pretrained of compressed models through the "spadi_ao" HfQuantizer."""

import json
import subprocess
import sys

import pytest
import torch
from models import token_batches
from safetensors.torch import load_file, save_file
from torchao.quantization import (
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxUnpackedToInt8Tensor,
    IntxWeightOnlyConfig,
    PerGroup,
)
from transformers import AutoModelForCausalLM

from spadi_ao import (
    DictionaryConfig,
    DictionaryTensor,
    LowRankConfig,
    LowRankTensor,
    SpadiAoConfig,
    attach_quantizer,
    sparsify_dictionary_,
)
from spadi_ao.serialization import CheckpointError

OVERRIDES = {
    r"q_proj|k_proj": {
        "dictionary_quantization": Int8WeightOnlyConfig(set_inductor_config=False),
        "values_dtype": "int8",
    },
    r"up_proj": {"dictionary_quantization": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))},
    r"down_proj": {
        "dictionary_quantization": Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        "values_dtype": "bfloat16",
    },
}
IDS = torch.arange(32).unsqueeze(0)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _save(model, path):
    attach_quantizer(model)
    model.save_pretrained(path)
    return path


@pytest.fixture
def compressed(tiny_llama):
    config = DictionaryConfig(
        compression_ratio=0.3, iterations=1, layer_overrides=OVERRIDES, grouping=None
    )  # q/k and v differ
    sparsify_dictionary_(tiny_llama, config, calibration=token_batches(4, 32, vocab=384), progress=False)
    return tiny_llama


def test_save_pretrained_from_pretrained_roundtrip(compressed, tmp_path):
    expected = _logits(compressed)
    _save(compressed, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "spadi_ao" and len(config["layers"]) == 14
    entry = config["layers"]["model.layers.1.mlp.up_proj.weight"]
    assert entry["type"] == "DictionaryTensor" and set(entry["layout"]) == {"k", "s"}
    assert entry["tensors"]["dictionary.qdata"]["dtype"] == "int8"

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert isinstance(loaded.config.quantization_config, SpadiAoConfig)
    weight = loaded.model.layers[1].mlp.up_proj.weight
    assert isinstance(weight, DictionaryTensor) and isinstance(weight.dictionary, IntxUnpackedToInt8Tensor)
    assert not weight.requires_grad
    assert loaded.model.layers[0].self_attn.q_proj.weight.dictionary.dtype == torch.int8
    assert torch.equal(_logits(loaded), expected)

    loaded.save_pretrained(tmp_path / "again")  # a loaded model re-saves as is
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), expected)


def test_low_rank_roundtrip(tiny_llama, tmp_path):
    sparsify_dictionary_(
        tiny_llama, LowRankConfig(compression_ratio=0.3), calibration=token_batches(2, 32, vocab=384), progress=False
    )
    expected = _logits(tiny_llama)
    loaded = AutoModelForCausalLM.from_pretrained(_save(tiny_llama, tmp_path / "model"))
    assert isinstance(loaded.model.layers[0].mlp.gate_proj.weight, LowRankTensor)
    assert torch.equal(_logits(loaded), expected)


def test_shared_dictionaries_are_stored_once_and_shared_again(tiny_llama, tmp_path):
    int4 = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    config = DictionaryConfig(
        compression_ratio=0.3, iterations=0, grouping="inputs", dictionary_quantization=int4, values_dtype="int8"
    )
    sparsify_dictionary_(tiny_llama, config, calibration=token_batches(2, 32, vocab=384), progress=False)
    expected = _logits(tiny_llama)
    path = _save(tiny_llama, tmp_path / "model")
    stored = [key for key in load_file(path / "model.safetensors") if key.endswith("dictionary.qdata")]
    assert len(stored) == 2 * 4  # 14 Linears, per block: one for q/k/v, one for gate/up, o_proj and down_proj their own
    loaded = AutoModelForCausalLM.from_pretrained(path)
    attention = loaded.model.layers[1].self_attn
    assert attention.q_proj.weight.dictionary is attention.v_proj.weight.dictionary
    assert isinstance(attention.q_proj.weight.dictionary, IntxUnpackedToInt8Tensor)
    assert torch.equal(_logits(loaded), expected)


def test_from_pretrained_in_a_fresh_process(compressed, tmp_path):
    torch.save(_logits(compressed), tmp_path / "expected.pt")
    _save(compressed, tmp_path / "model")
    script = f"""
import torch, spadi_ao
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
with torch.no_grad():
    assert torch.equal(model(torch.arange(32).unsqueeze(0)).logits, torch.load({str(tmp_path / "expected.pt")!r}))
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def _edit_config(path, edit):
    file = path / "config.json"
    config = json.loads(file.read_text())
    edit(config["quantization_config"])
    file.write_text(json.dumps(config))


def test_mismatched_config_layout_raises_before_loading(compressed, tmp_path):
    path = _save(compressed, tmp_path / "model")
    _edit_config(
        path, lambda q: q["layers"]["model.layers.0.mlp.down_proj.weight"]["tensors"]["values"].update(shape=[64, 3])
    )
    with pytest.raises(
        CheckpointError,
        match=r"down_proj.weight.values: stored shape \[64, \d+\] does not match the recorded layout \[64, 3\]",
    ):
        AutoModelForCausalLM.from_pretrained(path)


def test_config_listing_a_missing_layer_raises(compressed, tmp_path):
    path = _save(compressed, tmp_path / "model")
    _edit_config(
        path,
        lambda q: q["layers"].update(
            {"model.layers.7.mlp.up_proj.weight": q["layers"]["model.layers.0.mlp.up_proj.weight"]}
        ),
    )
    with pytest.raises(
        CheckpointError,
        match="lists compressed weight model.layers.7.mlp.up_proj.weight, which the LlamaForCausalLM does not have",
    ):
        AutoModelForCausalLM.from_pretrained(path)


def test_checkpoint_missing_an_inner_tensor_raises(compressed, tmp_path):
    path = _save(compressed, tmp_path / "model")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight.value_scale"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks inner tensor model.layers.1.self_attn.k_proj.weight.value_scale"):
        AutoModelForCausalLM.from_pretrained(path)


def test_truncated_checkpoint_raises(compressed, tmp_path):
    path = _save(compressed, tmp_path / "model")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="the file is corrupted"):
        AutoModelForCausalLM.from_pretrained(path)


def test_unknown_format_version_raises(compressed, tmp_path):
    path = _save(compressed, tmp_path / "model")
    _edit_config(path, lambda q: q.update(format_version=99))
    with pytest.raises(CheckpointError, match="unsupported spadi_ao format_version 99"):
        AutoModelForCausalLM.from_pretrained(path)


def test_compression_needs_calibration_not_from_pretrained(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="does require the model to be pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=SpadiAoConfig())
    with pytest.raises(ValueError, match="run sparsify_dictionary_ before attach_quantizer"):
        attach_quantizer(tiny_llama)
