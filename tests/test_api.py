import pytest
import torch
from models import tiny_llama, token_batches
from torch import nn

import spadi_ao
from spadi_ao import DictionaryConfig, DictionaryTensor, LowRankConfig, LowRankTensor, sparsify_dictionary_
from spadi_ao.api import select_linears
from spadi_ao.calibration import GramCollector, run_calibration

FAST = dict(allocation="uniform", grouping=None)  # per layer at the target ratio, as these checks assume


def _held_out_inputs(model, names, batches):
    """Each Linear's inputs on held-out batches: the independent reference for output error."""
    captured = {name: [] for name in names}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: captured[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for name, module in model.named_modules()
        if name in captured
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in captured.items()}


def _output_errors(dense_model, compressed_model, inputs):
    errors = {}
    modules = dict(compressed_model.named_modules())
    dense_modules = dict(dense_model.named_modules())
    for name, x in inputs.items():
        reference = x @ dense_modules[name].weight.T
        approximation = modules[name](x) - (modules[name].bias if modules[name].bias is not None else 0)
        errors[name] = ((reference - approximation).norm() / reference.norm()).item()
    return errors


def test_default_selection_skips_head_and_embeddings():
    model = tiny_llama()
    names = list(select_linears(model))
    assert "lm_head" not in names and len(names) == 2 * 7
    assert all(name.startswith("model.layers.") for name in names)


def test_qkv_and_gate_up_share_one_gram():
    model = tiny_llama()
    targets = select_linears(model)
    with GramCollector(targets) as collector:
        run_calibration(model, token_batches(2, 16), progress=False)
    groups = {owner: sorted(n.rsplit(".", 1)[1] for n in members) for owner, members in collector.groups.items()}
    assert sorted(groups.values()) == sorted(
        [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * 2
    )
    assert collector.memory_bytes == 2 * (3 * 64 * 64 + 160 * 160) * 8


def test_gram_equals_explicit_inputs():
    model = tiny_llama()
    batches = token_batches(3, 16)
    targets = select_linears(model)
    with GramCollector(targets, exact=True) as collector:
        run_calibration(model, batches, progress=False)
    inputs = _held_out_inputs(tiny_llama(), list(targets), batches)
    for name, x in inputs.items():
        x = x.double()
        assert torch.allclose(collector.gram(name), x.T @ x / x.shape[0], rtol=1e-9, atol=1e-12)
        assert collector.tokens(name) == 48


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.4, 0.5])
def test_cospadi_beats_svd_llm_on_held_out_output_error(ratio):
    calibration, held_out = token_batches(12, 32, seed=1), token_batches(4, 32, seed=2)
    dense = tiny_llama()
    names = list(select_linears(dense))
    inputs = _held_out_inputs(dense, names, held_out)
    results = {}
    for config in (DictionaryConfig(compression_ratio=ratio, **FAST), LowRankConfig(compression_ratio=ratio)):
        model = tiny_llama()
        report = sparsify_dictionary_(model, config, calibration=calibration, progress=False)
        assert report.compression_ratio >= ratio
        results[type(config).__name__] = _output_errors(dense, model, inputs)
    cospadi, svd_llm = results["DictionaryConfig"], results["LowRankConfig"]
    mean = lambda errors: sum(errors.values()) / len(errors)  # noqa: E731
    assert mean(cospadi) < mean(svd_llm)
    assert sum(cospadi[n] < svd_llm[n] for n in names) >= 0.75 * len(names)


def test_structured_weights_whitened_error_beats_low_rank():
    """A union-of-subspaces weight: each output mixes a few of many directions."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(96, 48, generator=generator)
    mask = torch.rand(128, 96, generator=generator) < 0.1
    weight = (torch.randn(128, 96, generator=generator) * mask) @ basis
    errors = {}
    for config in (DictionaryConfig(compression_ratio=0.4, **FAST), LowRankConfig(compression_ratio=0.4)):
        module = nn.Sequential(nn.Linear(48, 128, bias=False))
        module[0].weight.data.copy_(weight)
        calibration = [torch.randn(64, 48, generator=generator) for _ in range(4)]
        report = sparsify_dictionary_(module, config, calibration=calibration, progress=False)
        errors[report.method] = report.layers[0].whitened_error
    assert errors["cospadi"] < 0.8 * errors["svd-llm"]


def test_subclass_types_bytes_and_ratio_bounds():
    model = tiny_llama()
    report = sparsify_dictionary_(
        model, DictionaryConfig(compression_ratio=0.3, **FAST), calibration=token_batches(2, 16), progress=False
    )
    for layer in report.layers:
        module = model.get_submodule(layer.name)
        assert isinstance(module.weight, DictionaryTensor)
        inner = sum(
            t.numel() * t.element_size()
            for t in (module.weight.dictionary, module.weight.values, module.weight.bitmask)
        )
        assert inner == layer.stored_bytes
        assert 0.3 <= layer.compression_ratio <= 0.3 + 0.02  # tiny 64-wide layers: coarse k granularity
    stats = spadi_ao.compression_stats(model)
    assert stats["linear_compression_ratio"] == pytest.approx(report.compression_ratio)
    assert stats["model_stored_bytes"] < stats["model_dense_bytes"]
    assert isinstance(model.lm_head.weight, torch.Tensor) and not isinstance(model.lm_head.weight, DictionaryTensor)


def test_prepare_convert_equals_one_liner():
    batches = token_batches(3, 16)
    config = DictionaryConfig(compression_ratio=0.3, **FAST)
    one_liner = tiny_llama()
    sparsify_dictionary_(one_liner, config, calibration=batches, progress=False)
    prepared = tiny_llama()
    spadi_ao.prepare_calibration(prepared)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    sparsify_dictionary_(prepared, config, progress=False)
    assert not hasattr(prepared, "_spadi_calibration")
    for name, module in one_liner.named_modules():
        if isinstance(module, nn.Linear) and isinstance(module.weight, DictionaryTensor):
            other = prepared.get_submodule(name).weight
            assert torch.allclose(module.weight.dequantize(), other.dequantize(), atol=1e-5)


def test_filter_fn_receives_module_and_name():
    model = tiny_llama()
    seen = []

    def only_mlp(module, name):
        seen.append((type(module).__name__, name))
        return ".mlp." in name

    report = sparsify_dictionary_(
        model, LowRankConfig(compression_ratio=0.3), filter_fn=only_mlp, calibration=token_batches(1, 8), progress=False
    )
    assert {layer.name.rsplit(".", 1)[1] for layer in report.layers} == {"gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.model.layers[0].mlp.up_proj.weight, LowRankTensor)
    assert not isinstance(model.model.layers[0].self_attn.q_proj.weight, LowRankTensor)
    assert ("Linear", "lm_head") in seen


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "config, calibration, match",
    [
        (DictionaryConfig(compression_ratio=0.99, **FAST), "batches", "compression_ratio"),
        (LowRankConfig(compression_ratio=0.98), "batches", "compression_ratio"),
        (DictionaryConfig(compression_ratio=0.3), [], "calibration is empty"),
    ],
)
def test_bad_input_raises_and_leaves_model_untouched(config, calibration, match):
    model = tiny_llama()
    before = _weights(model)
    batches = token_batches(1, 8) if calibration == "batches" else calibration
    with pytest.raises(ValueError, match=match):
        sparsify_dictionary_(model, config, calibration=batches, progress=False)
    after = _weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_non_finite_weight_is_rejected_before_anything_changes():
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sparsify_dictionary_(
            model, LowRankConfig(compression_ratio=0.3), calibration=token_batches(1, 8), progress=False
        )
    assert not any(isinstance(m.weight, LowRankTensor) for m in model.modules() if isinstance(m, nn.Linear))


def test_already_compressed_is_rejected():
    model = tiny_llama()
    sparsify_dictionary_(model, LowRankConfig(compression_ratio=0.3), calibration=token_batches(1, 8), progress=False)
    with pytest.raises(ValueError, match="already compressed"):
        sparsify_dictionary_(
            model, DictionaryConfig(compression_ratio=0.3), calibration=token_batches(1, 8), progress=False
        )


def test_failure_midway_leaves_model_as_it_was(monkeypatch):
    model = tiny_llama()
    before = _weights(model)
    calls = []
    original = spadi_ao.layer.compress_weight

    def failing(name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("solver crashed")
        return original(name, *args, **kwargs)

    monkeypatch.setattr(spadi_ao.layer, "compress_weight", failing)
    with pytest.raises(RuntimeError, match="solver crashed"):
        sparsify_dictionary_(
            model, LowRankConfig(compression_ratio=0.3), calibration=token_batches(1, 8), progress=False
        )
    after = _weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not hasattr(model, "_spadi_calibration")


def test_wrong_config_type():
    with pytest.raises(TypeError, match="DictionaryConfig or LowRankConfig"):
        sparsify_dictionary_(tiny_llama(), {"compression_ratio": 0.3})
