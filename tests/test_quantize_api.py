"""torchao's entry point: ``quantize_`` with spadi_ao's configs equals ``sparsify_dictionary_`` on the same layers,
the defaults and the paper preset, composition with torchao configs in both orders, and compile-cache hashes."""

import copy
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch
from models import tiny_llama, token_batches
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quant_api, quantize_
from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER, register_quantize_module_handler

import spadi_ao
from spadi_ao import (
    DictionaryConfig,
    DictionaryTensor,
    LowRankConfig,
    LowRankTensor,
    prepare_calibration,
    sparsify_dictionary_,
)
from spadi_ao.calibration import run_calibration
from spadi_ao.grouping import storage_key
from spadi_ao.integrations.torchao import quantize_dictionary
from spadi_ao.layer import compress_weight
from spadi_ao.transform import WEIGHT_SPACE_WARNING

INT8 = Int8WeightOnlyConfig(set_inductor_config=False)
INT4 = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
PER_LAYER = dict(allocation="uniform", grouping=None)  # the per-layer equivalent of the default: what quantize_ runs
CONFIGS = {"dictionary": DictionaryConfig(**PER_LAYER), "low-rank": LowRankConfig()}


def _not_head(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn != "lm_head"


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _assert_same_weights(actual: nn.Module, expected: nn.Module) -> None:
    """Every Linear's weight of the same class with bit-identical inner tensors."""
    expected_linears = _linears(expected)
    for name, module in _linears(actual).items():
        weight, reference = module.weight, expected_linears[name].weight
        assert type(weight) is type(reference), name
        names = reference.__tensor_flatten__()[0] if isinstance(reference, (DictionaryTensor, LowRankTensor)) else None
        if names is None:
            assert torch.equal(weight, reference), name
        else:
            assert weight.__tensor_flatten__()[0] == names
            for inner in names:
                assert torch.equal(getattr(weight, inner), getattr(reference, inner)), f"{name}.{inner}"


def _prepared(model: nn.Module, batches) -> nn.Module:
    prepare_calibration(model)
    run_calibration(model, batches, progress=False)
    return model


# ------------------------------------------------------------------------------------------------ defaults


def test_default_is_the_measured_best_and_the_preset_is_the_paper():
    default = DictionaryConfig()
    assert (
        default.solver,
        default.iterations,
        default.allocation,
        default.grouping,
        default.gram_shrinkage,
        default.output_weighting,
    ) == ("procrustes", 20, "knapsack", "inputs", 0.3, "loss")
    assert LowRankConfig().allocation == "uniform"
    paper = DictionaryConfig(
        allocation="uniform",
        grouping=None,
        gram_shrinkage=0.0,
        solver="ksvd",
        init="random-columns",
        iterations=60,
        atoms_per_step=1,
        power_iterations=8,
        output_weighting="none",
        seed=42,
    )
    assert DictionaryConfig.paper() == paper
    assert DictionaryConfig.paper(compression_ratio=0.4, iterations=3) == DictionaryConfig(
        **{**vars(paper), "compression_ratio": 0.4, "iterations": 3}
    )
    with pytest.raises(ValueError, match="iterations"):
        DictionaryConfig.paper(iterations=-1)
    assert isinstance(default, AOBaseConfig) and isinstance(LowRankConfig(), AOBaseConfig)


def test_paper_preset_runs_the_papers_ksvd():
    """60 iterations of exact-OMP K-SVD from random columns fit better than their own start (0 iterations)
    and than the one-shot SVD solution; the preset is deterministic (seed 42)."""
    torch.manual_seed(0)
    weight = torch.randn(40, 24) @ torch.randn(24, 32) / 5
    inputs = torch.randn(256, 32)
    gram = inputs.T.double() @ inputs.double() / 256
    _, paper = compress_weight("w", weight, gram, DictionaryConfig.paper(compression_ratio=0.3))
    _, start = compress_weight("w", weight, gram, DictionaryConfig.paper(compression_ratio=0.3, iterations=0))
    _, one_shot = compress_weight("w", weight, gram, DictionaryConfig(compression_ratio=0.3, fast_steps=0, **PER_LAYER))
    assert paper.whitened_error < 0.9 * start.whitened_error
    assert paper.whitened_error < one_shot.whitened_error
    again, _ = compress_weight("w", weight, gram, DictionaryConfig.paper(compression_ratio=0.3))
    first, _ = compress_weight("w", weight, gram, DictionaryConfig.paper(compression_ratio=0.3))
    assert torch.equal(again.values, first.values) and torch.equal(again.dictionary, first.dictionary)


# ------------------------------------------------------------------------------------- quantize_ == sparsify_


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_with_prepared_grams_equals_sparsify(name):
    config, batches = CONFIGS[name], token_batches(3, 16)
    model = tiny_llama()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Grams are there: no weight-space warning
        quantize_(_prepared(model, batches), config)
    sparsify_dictionary_(reference, config, calibration=batches, progress=False)
    _assert_same_weights(model, reference)
    assert (
        type(model.lm_head.weight) is nn.Parameter and model.lm_head.weight is model.model.embed_tokens.weight
    )  # as sparsify_
    collector = model._spadi_calibration
    assert collector.memory_bytes == 0 and not collector._handles  # every Gram freed, every hook gone


@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantize_without_grams_fits_weight_space_with_one_warning(name):
    config = CONFIGS[name]
    model = tiny_llama()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quantize_(model, config, filter_fn=_not_head)
    assert [str(w.message) for w in caught] == [WEIGHT_SPACE_WARNING]
    sparsify_dictionary_(reference, config, filter_fn=_not_head, progress=False)
    _assert_same_weights(model, reference)


def test_layer_overrides_and_fqn_to_config_give_per_layer_settings():
    batches = token_batches(3, 16)
    overrides = {r"mlp\.down_proj$": {"compression_ratio": 0.5}, r"self_attn\.o_proj$": {"rho": 3.0}}
    config = DictionaryConfig(layer_overrides=overrides, **PER_LAYER)
    model, fqn_model, reference = tiny_llama(), tiny_llama(), tiny_llama()
    quantize_(_prepared(model, batches), config)
    sparsify_dictionary_(reference, config, calibration=batches, progress=False)
    _assert_same_weights(model, reference)
    assert model.model.layers[1].mlp.down_proj.weight.num_atoms < model.model.layers[1].mlp.up_proj.weight.num_atoms

    down = DictionaryConfig(compression_ratio=0.5, **PER_LAYER)
    per_fqn = FqnToConfig({"model.layers.1.mlp.down_proj": down, "re:.*self_attn\\.q_proj": LowRankConfig()})
    quantize_(_prepared(fqn_model, batches), per_fqn, filter_fn=None)
    assert isinstance(fqn_model.model.layers[0].self_attn.q_proj.weight, LowRankTensor)
    assert isinstance(fqn_model.model.layers[1].self_attn.q_proj.weight, LowRankTensor)
    assert type(fqn_model.model.layers[0].mlp.down_proj.weight) is nn.Parameter  # not named: untouched
    only_down = tiny_llama()
    sparsify_dictionary_(
        only_down,
        down,
        filter_fn=lambda m, fqn: fqn == "model.layers.1.mlp.down_proj",
        calibration=batches,
        progress=False,
    )
    for inner in ("dictionary", "values", "bitmask"):
        assert torch.equal(
            getattr(fqn_model.model.layers[1].mlp.down_proj.weight, inner),
            getattr(only_down.model.layers[1].mlp.down_proj.weight, inner),
        )

    with pytest.raises(ValueError, match="layer_overrides match module names.*FqnToConfig"):
        quantize_(tiny_llama(), config, filter_fn=_not_head)


def test_quantize_refuses_bad_input_before_changing_the_weight():
    model = tiny_llama()
    with pytest.warns(UserWarning, match="without prepared Grams"):
        quantize_(model, DictionaryConfig(**PER_LAYER), filter_fn=_not_head)
    compressed = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(ValueError, match="already compressed"):
        quantize_(model, DictionaryConfig(**PER_LAYER), filter_fn=_not_head)
    assert model.model.layers[0].mlp.up_proj.weight is compressed
    tiny = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="compression_ratio"):
        quantize_(tiny, DictionaryConfig(compression_ratio=0.9, **PER_LAYER))
    assert type(tiny[0].weight) is nn.Parameter


# ------------------------------------------------------------------------------------- composition, both orders


def test_quantize_then_compress_is_a_clear_error():
    model = tiny_llama()
    quantize_(model, INT8, filter_fn=_not_head)
    quantized = model.model.layers[0].mlp.up_proj.weight
    with pytest.raises(ValueError, match=r"already quantised\?\).*compress first, then quantise"):
        quantize_(model, DictionaryConfig(), filter_fn=_not_head)
    with pytest.raises(ValueError, match=r"already quantised\?\).*compress first, then quantise"):
        sparsify_dictionary_(model, DictionaryConfig(), calibration=token_batches(1, 16), progress=False)
    assert model.model.layers[0].mlp.up_proj.weight is quantized


@pytest.mark.parametrize("config", [INT8, INT4], ids=["int8", "int4"])
def test_compress_then_quantize_quantises_the_dictionaries(config):
    model = tiny_llama()
    sparsify_dictionary_(model, DictionaryConfig(), calibration=token_batches(2, 16), progress=False)
    before = {
        name: module.weight for name, module in _linears(model).items() if isinstance(module.weight, DictionaryTensor)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(model, config, filter_fn=_not_head)
    for name, weight in before.items():
        expected = quantize_dictionary(weight, config)
        actual = _linears(model)[name].weight
        assert torch.equal(actual.dequantize(), expected.dequantize()), name
    attention = model.model.layers[0].self_attn  # shared-input dictionaries stay shared once quantised
    assert storage_key(attention.q_proj.weight.dictionary) == storage_key(attention.k_proj.weight.dictionary)


@dataclass
class _LateConfig(AOBaseConfig):
    scale: float = 2.0


def test_handlers_registered_after_import_compose():
    """A config registered after ``import spadi_ao``, and a torchao handler registered again, both see
    compressed weights through the lookup view (the table itself is never rewritten)."""
    assert isinstance(quant_api._QUANTIZE_CONFIG_HANDLER, spadi_ao.integrations.torchao.CompressedAwareHandlers)
    original = _QUANTIZE_CONFIG_HANDLER[Int8WeightOnlyConfig]

    @register_quantize_module_handler(_LateConfig)
    def _scale(module, config, *, parameter_name="weight"):
        setattr(
            module, parameter_name, nn.Parameter(getattr(module, parameter_name) * config.scale, requires_grad=False)
        )
        return module

    try:
        dense = nn.Sequential(nn.Linear(8, 4))
        weight = dense[0].weight.detach().clone()
        quantize_(dense, _LateConfig())
        assert torch.equal(dense[0].weight, 2 * weight)

        model = tiny_llama()
        sparsify_dictionary_(model, DictionaryConfig(), calibration=token_batches(2, 16), progress=False)
        compressed = model.model.layers[0].mlp.down_proj.weight
        with pytest.warns(UserWarning, match="_LateConfig is not supported for a dictionary"):
            quantize_(model, _LateConfig(), filter_fn=_not_head)
        assert model.model.layers[0].mlp.down_proj.weight is compressed

        register_quantize_module_handler(Int8WeightOnlyConfig)(original)  # registered again, after import
        assert _QUANTIZE_CONFIG_HANDLER[Int8WeightOnlyConfig] is original
        quantize_(model, INT8, filter_fn=_not_head)
        assert model.model.layers[0].mlp.down_proj.weight.dictionary.dtype == torch.int8
    finally:
        del _QUANTIZE_CONFIG_HANDLER[_LateConfig]
        _QUANTIZE_CONFIG_HANDLER[Int8WeightOnlyConfig] = original


# ------------------------------------------------------------------------------------------- compile caches


def _weights():
    torch.manual_seed(0)
    model = tiny_llama()
    sparsify_dictionary_(model, DictionaryConfig(**PER_LAYER), calibration=token_batches(2, 16), progress=False)
    low_rank = tiny_llama()
    sparsify_dictionary_(low_rank, LowRankConfig(), calibration=token_batches(2, 16), progress=False)
    return model, low_rank


def test_stable_hash_depends_on_layout_not_values():
    model, low_rank = _weights()
    weight = model.model.layers[0].mlp.up_proj.weight
    same_layout = DictionaryTensor(weight.dictionary + 1, weight.values * 2, weight.bitmask, weight.dtype)
    assert same_layout._stable_hash_for_caching() == weight._stable_hash_for_caching()
    variants = [
        weight,
        model.model.layers[0].mlp.down_proj.weight,  # other shapes
        quantize_dictionary(weight, INT8),  # int8 dictionary with a scale
        quantize_dictionary(weight, INT4),  # a nested torchao tensor
        quantize_dictionary(weight, None, "bfloat16"),
        DictionaryTensor(weight.dictionary.T.contiguous().T, weight.values, weight.bitmask, weight.dtype),  # strides
        low_rank.model.layers[0].mlp.up_proj.weight,
    ]
    hashes = [variant._stable_hash_for_caching() for variant in variants]
    assert len(set(hashes)) == len(hashes)
    assert all(isinstance(h, str) and len(h) == 32 for h in hashes)


_HASH_SCRIPT = """
import torch, spadi_ao
from spadi_ao.integrations.torchao import quantize_dictionary
from torchao.quantization import IntxWeightOnlyConfig, PerGroup
weight = spadi_ao.DictionaryTensor(
    torch.zeros(6, 32), torch.zeros(5, 3), torch.zeros(5, 1, dtype=torch.uint8), torch.float32
)
int4 = quantize_dictionary(weight, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)), "int8")
low_rank = spadi_ao.LowRankTensor(torch.zeros(2, 32), torch.zeros(5, 2), torch.float32)
print(weight._stable_hash_for_caching(), int4._stable_hash_for_caching(), low_rank._stable_hash_for_caching())
"""


def test_stable_hash_is_the_same_in_every_process():
    outputs = []
    for seed in ("1", "2"):
        environment = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", _HASH_SCRIPT], capture_output=True, text=True, env=environment, check=True
        )
        outputs.append(result.stdout.split())
    assert outputs[0] == outputs[1] and len(set(outputs[0])) == 3


def test_compile_asks_for_no_default_cache_hash():
    """torch warns once per subclass that lacks ``_stable_hash_for_caching`` when it builds an AOT-autograd
    cache key."""
    from torch._dynamo.utils import warn_once_cache

    model, low_rank = _weights()
    for message in [m for m in warn_once_cache if "_stable_hash_for_caching" in m]:
        warn_once_cache.discard(message)  # an earlier compile in this process may have warned already
    layers = nn.Sequential(model.model.layers[0].mlp.up_proj, low_rank.model.layers[0].mlp.down_proj)
    torch._dynamo.reset()
    compiled = torch.compile(layers, fullgraph=True)  # Inductor builds the AOT-autograd cache key
    x = torch.randn(2, 3, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch._functorch.config.patch(enable_autograd_cache=True), torch.no_grad():
            torch.testing.assert_close(compiled(x), layers(x))
    assert not [w for w in caught if "_stable_hash_for_caching" in str(w.message)]
