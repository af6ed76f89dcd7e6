"""Calibration data as users hold it: tokenizer output, (seq,) tensors, padding, train-mode models."""

import copy

import pytest
import torch
from models import reference_gram
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from spadi_ao import DictionaryConfig, LowRankConfig, prepare_calibration, sparsify_dictionary_
from spadi_ao.allocation import output_sensitivity
from spadi_ao.api import select_linears
from spadi_ao.calibration import GramCollector, run_calibration

SEQ_A = list(range(5, 17))  # 12 tokens
SEQ_B = list(range(40, 48))  # 8 tokens


def _llama(dropout: float = 0.0) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=dropout,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def _padded() -> dict[str, torch.Tensor]:
    """SEQ_A and SEQ_B in one batch, SEQ_B right-padded with 4 pad ids, as a tokenizer returns them."""
    ids = torch.tensor([SEQ_A, SEQ_B + [0] * 4])
    mask = torch.tensor([[1] * 12, [1] * 8 + [0] * 4])
    return {"input_ids": ids, "attention_mask": mask}


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight.dequantize() for name, module in select_linears(model).items()}


def _reference_gram(model: nn.Module, name: str, sequences: list[list[int]]) -> tuple[torch.Tensor, int]:
    """X^T X / T of ``name``'s input over the unpadded sequences."""
    return reference_gram(model, name, [torch.tensor([sequence]) for sequence in sequences])


def test_tokenizer_output_directly_and_in_a_list(tiny_llama, tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    encoding = tokenizer(["def f(x): return x", "class A: pass"], return_tensors="pt", padding=True)
    assert not isinstance(encoding, dict)  # a BatchEncoding is a Mapping, not a dict
    reference = _weights_after(
        tiny_llama, [{"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}]
    )
    for calibration in (encoding, [encoding]):
        model = _fresh_like(tiny_llama)
        sparsify_dictionary_(model, LowRankConfig(compression_ratio=0.3), calibration=calibration, progress=False)
        assert all(torch.equal(_weights(model)[name], weight) for name, weight in reference.items())


def _fresh_like(model: LlamaForCausalLM) -> LlamaForCausalLM:
    clone = LlamaForCausalLM(model.config).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def _weights_after(model: LlamaForCausalLM, calibration) -> dict[str, torch.Tensor]:
    clone = _fresh_like(model)
    sparsify_dictionary_(clone, LowRankConfig(compression_ratio=0.3), calibration=calibration, progress=False)
    return _weights(clone)


def test_one_dimensional_ids_are_one_sequence():
    model = _llama()
    expected = _weights_after(model, [torch.tensor([SEQ_A])])
    assert all(torch.equal(_weights_after(model, torch.tensor(SEQ_A))[n], w) for n, w in expected.items())


def test_padded_batch_gives_the_gram_of_the_unpadded_sequences():
    model = _llama()
    targets = select_linears(model)
    collector = GramCollector(targets, model=model)
    run_calibration(model, [_padded()], progress=False)
    collector.remove()
    unpadded = GramCollector(targets, model=model)
    run_calibration(model, [torch.tensor(SEQ_A), torch.tensor(SEQ_B)], progress=False)
    unpadded.remove()
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        reference, tokens = _reference_gram(model, name, [SEQ_A, SEQ_B])
        assert collector.tokens(name) == tokens == 20
        torch.testing.assert_close(collector.gram(name), reference, rtol=1e-5, atol=1e-7)
        assert collector.sequences(name) == 2
        assert collector.shrinkage(name) == pytest.approx(unpadded.shrinkage(name), rel=1e-5, abs=1e-9)


def test_padding_is_left_out_of_the_report_token_count():
    model = _llama()
    report = sparsify_dictionary_(model, LowRankConfig(compression_ratio=0.3), calibration=_padded(), progress=False)
    assert report.calibration_tokens == 20


def test_sensitivity_drops_padded_positions():
    model = _llama()
    targets = select_linears(model)
    padded = {"input_ids": torch.tensor([SEQ_A + [0] * 5]), "attention_mask": torch.tensor([[1] * 12 + [0] * 5])}
    reference = output_sensitivity(model, targets, [torch.tensor([SEQ_A])])
    for name, value in output_sensitivity(model, targets, [padded]).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-12)


def test_knapsack_takes_dict_batches():
    model = _llama()
    config = DictionaryConfig(compression_ratio=0.3, allocation="knapsack", atoms_per_step=4)
    expected = _fresh_like(model)
    sparsify_dictionary_(expected, config, calibration=[torch.tensor([SEQ_A])], progress=False)
    batch = {"input_ids": torch.tensor([SEQ_A]), "labels": torch.tensor([SEQ_A])}  # as a training set's batches have it
    sparsify_dictionary_(model, config, calibration=[batch], progress=False)
    assert all(torch.equal(_weights(model)[name], weight) for name, weight in _weights(expected).items())


def test_calibration_runs_in_eval_mode_and_restores_the_modes():
    model = _llama(dropout=0.5)
    expected = _weights_after(model, [torch.tensor([SEQ_A])])
    model.train()
    model.model.layers[0].mlp.eval()  # a mix of modes comes back as it was
    torch.manual_seed(1)
    sparsify_dictionary_(
        model, LowRankConfig(compression_ratio=0.3), calibration=[torch.tensor([SEQ_A])], progress=False
    )
    assert all(torch.equal(_weights(model)[name], weight) for name, weight in expected.items())
    assert model.training and model.model.layers[0].self_attn.training and not model.model.layers[0].mlp.training


def test_layer_override_matching_nothing_raises_before_any_change():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = DictionaryConfig(
        compression_ratio=0.3, layer_overrides={r"mlp\.up_projection$": {"compression_ratio": 0.2}}
    )
    with pytest.raises(ValueError, match=r"layer_overrides pattern 'mlp\\\\.up_projection\$' matches none"):
        sparsify_dictionary_(model, config, calibration=torch.tensor([SEQ_A]), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gpt2_conv1d_is_named_as_unsupported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()
    with pytest.raises(ValueError, match="Conv1D .*not support"):
        sparsify_dictionary_(
            model, DictionaryConfig(compression_ratio=0.3), calibration=torch.arange(8), progress=False
        )


def test_prepare_convert_leaves_padding_out_too():
    model = _llama()
    collector = prepare_calibration(model)
    with torch.no_grad():
        model(**_padded())
    collector.remove()
    reference, tokens = _reference_gram(model, "model.layers.0.self_attn.q_proj", [SEQ_A, SEQ_B])
    assert collector.tokens("model.layers.0.self_attn.q_proj") == tokens
    torch.testing.assert_close(collector.gram("model.layers.0.self_attn.q_proj"), reference, rtol=1e-5, atol=1e-7)
