"""Checkpoints as transformers users make them: save_pretrained right after compressing, loading in bfloat16,
loading without spadi_ao, and ``spadi-ao info`` on the folder."""

import json
import subprocess
import sys

import pytest
import torch
from models import token_batches
from torchao.quantization import Int8WeightOnlyConfig
from transformers import AutoModelForCausalLM

from spadi_ao import DictionaryConfig, DictionaryTensor, SpadiAoConfig, sparsify_dictionary_
from spadi_ao.cli import main

IDS = torch.arange(32).unsqueeze(0)
OVERRIDES = {
    r"self_attn\.[qkv]_proj": {"values_dtype": "int8"},
    r"down_proj": {"dictionary_quantization": Int8WeightOnlyConfig(set_inductor_config=False)},
}


def _compressed(model):
    config = DictionaryConfig(
        compression_ratio=0.3, allocation="knapsack", grouping="inputs", layer_overrides=OVERRIDES
    )
    sparsify_dictionary_(model, config, calibration=token_batches(2, 32, vocab=384), progress=False)
    return model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_save_pretrained_right_after_compressing_roundtrips(tiny_llama, tmp_path):
    model = _compressed(tiny_llama)
    expected = _logits(model)
    model.save_pretrained(tmp_path / "model")  # no attach_quantizer
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert isinstance(loaded.model.layers[0].self_attn.q_proj.weight, DictionaryTensor)
    assert torch.equal(_logits(loaded), expected)
    compression = loaded.config.quantization_config.compression
    assert compression["method"] == "cospadi" and compression["config"]["allocation"] == "knapsack"
    assert compression["calibration_tokens"] == 64


def test_loading_without_spadi_ao_fails_loudly(tiny_llama, tmp_path):
    _compressed(tiny_llama).save_pretrained(tmp_path / "model")
    script = f"""
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r})
except RuntimeError as exc:
    print("RAISED", exc)
    sys.exit(3)
print("LOADED")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "spadi_ao" not in [line.split()[0] for line in result.stdout.splitlines() if line]
    assert result.returncode == 3, result.stdout + result.stderr[-2000:]
    assert "ignore_mismatched_sizes" in result.stdout
    assert "Unknown quantization type, got spadi_ao" in result.stderr
    assert "q_proj.weight" in result.stderr and "MISMATCH" in result.stderr


def test_from_pretrained_in_bfloat16_converts_the_stored_floats(tiny_llama, tmp_path):
    model = _compressed(tiny_llama)
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    q_proj = loaded.model.layers[0].self_attn.q_proj.weight
    original = model.model.layers[0].self_attn.q_proj.weight
    assert q_proj.dtype == q_proj.dictionary.dtype == torch.bfloat16
    assert q_proj.values.dtype == torch.int8 and torch.equal(q_proj.values, original.values)  # int8 parts as stored
    assert torch.equal(q_proj.bitmask, original.bitmask) and torch.equal(q_proj.value_scale, original.value_scale)
    gate, up = loaded.model.layers[0].mlp.gate_proj.weight, loaded.model.layers[0].mlp.up_proj.weight
    assert gate.dictionary is up.dictionary  # the group's dictionary is still shared
    torch.testing.assert_close(q_proj.dequantize(torch.float32), original.dequantize(), rtol=2e-2, atol=2e-2)
    assert _logits(loaded).dtype == torch.bfloat16


def test_info_reads_a_save_pretrained_folder(tiny_llama, tmp_path, capsys):
    _compressed(tiny_llama).save_pretrained(tmp_path / "model")
    assert main(["info", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "14 Linear weights as DictionaryTensor" in out
    assert "int8 parts: dictionary in 2 weights, values in 6 weights" in out
    for line in (
        "method cospadi",
        "solver: procrustes",
        "allocation: knapsack",
        "grouping: inputs",
        "gram_shrinkage: 0.3",
        "calibration: 64 tokens",
    ):
        assert line in out, out
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["quantization_config"]["compression"]["config"]["grouping"] == "inputs"
    assert isinstance(SpadiAoConfig.from_dict(config["quantization_config"]), SpadiAoConfig)


def test_check_bitmask_counts_every_row_like_dense_math():
    from spadi_ao.format import check_bitmask, pack_codes

    generator = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(13, generator=generator)[:5] for _ in range(6)])
    _, bitmask = pack_codes(indices, torch.randn(6, 5, generator=generator), 13)
    check_bitmask(bitmask, 13, 5)  # well formed
    for row, byte, bit in ((2, 0, 0), (4, 1, 7)):  # (4, 1, 7) is a padding bit: 13 atoms use 5 bits of byte 1
        damaged = bitmask.clone()
        damaged[row, byte] ^= 1 << bit
        with pytest.raises(ValueError, match=f"bitmask row {row} sets"):
            check_bitmask(damaged, 13, 5)


def test_a_damaged_bitmask_fails_loading_with_a_clear_error(tiny_llama, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from spadi_ao.serialization import WEIGHTS_NAME, CheckpointError, load_compressed, save_compressed

    save_compressed(_compressed(tiny_llama), tmp_path / "model")
    with safe_open(tmp_path / "model" / WEIGHTS_NAME, framework="pt") as stored:
        metadata = stored.metadata()
    tensors = load_file(tmp_path / "model" / WEIGHTS_NAME)
    key = next(name for name in tensors if name.endswith("q_proj.weight.bitmask"))
    tensors[key][0, 0] ^= 1
    save_file(tensors, tmp_path / "model" / WEIGHTS_NAME, metadata=metadata)
    with pytest.raises(CheckpointError, match="bitmask row 0 sets .* the checkpoint is damaged"):
        load_compressed(tmp_path / "model")
