import pytest
import torch
import torch.nn.functional as F
from models import tiny_llama, token_batches
from torch import nn

import spadi_ao
from spadi_ao import DictionaryConfig, DictionaryTensor, sparsify_dictionary_
from spadi_ao.api import select_linears
from spadi_ao.budget import dictionary_budget
from spadi_ao.calibration import GramCollector, run_calibration
from spadi_ao.grouping import average_gram, group_layers, inputs_group_key, paper_group_key, split_bytes
from spadi_ao.layer import compress_group
from spadi_ao.serialization import flatten_state_dict, load_compressed, save_compressed, unflatten_state_dict
from spadi_ao.solvers.ksvd import ksvd
from spadi_ao.solvers.omp import codes_to_dense
from spadi_ao.solvers.whitening import whiten

ONE_SHOT = dict(solver="ksvd", iterations=0)


def test_paper_grouping_pairs_blocks_for_qkv_up_gate_only():
    assert paper_group_key("model.layers.4.self_attn.q_proj") == paper_group_key("model.layers.5.self_attn.q_proj")
    assert paper_group_key("model.layers.5.self_attn.q_proj") != paper_group_key("model.layers.6.self_attn.q_proj")
    assert paper_group_key("model.layers.4.self_attn.q_proj") != paper_group_key("model.layers.4.self_attn.k_proj")
    assert paper_group_key("model.layers.4.mlp.gate_proj") == paper_group_key("model.layers.5.mlp.gate_proj")
    assert paper_group_key("model.layers.4.self_attn.o_proj") is None
    assert paper_group_key("model.layers.4.mlp.down_proj") is None
    assert paper_group_key("lm_head") is None


def test_inputs_grouping_joins_linears_that_read_one_input():
    keys = {
        leaf: inputs_group_key(f"model.layers.3.{leaf}")
        for leaf in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    assert keys["self_attn.q_proj"] == keys["self_attn.k_proj"] == keys["self_attn.v_proj"] != keys["mlp.up_proj"]
    assert keys["mlp.gate_proj"] == keys["mlp.up_proj"]
    assert keys["self_attn.o_proj"] is None and keys["mlp.down_proj"] is None
    assert inputs_group_key("model.layers.3.self_attn.q_proj") != inputs_group_key("model.layers.4.self_attn.q_proj")


def test_group_layers_partitions_in_order_and_rejects_colliding_keys():
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "o_proj")]
    units = group_layers(names, "paper")
    assert sorted(n for unit in units.values() for n in unit) == sorted(names)
    assert list(units.values())[0] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert ["model.layers.2.self_attn.q_proj"] in units.values()
    assert group_layers(names, None) == {name: [name] for name in names}
    with pytest.raises(ValueError, match="collides"):
        group_layers(["a", "b"], lambda name: "b" if name == "a" else None)


@pytest.mark.parametrize("total, weights", [(10, [1, 1, 1]), (7, [3, 1]), (1000, [64, 32, 32]), (0, [5])])
def test_split_bytes_sums_exactly(total, weights):
    shares = split_bytes(total, weights)
    assert sum(shares) == total and all(share >= 0 for share in shares)
    assert all(abs(share - total * w / sum(weights)) < 1 for share, w in zip(shares, weights))


def test_grouped_codes_reconstruct_each_layer_exactly_when_they_share_a_subspace():
    """Two layers whose rows live in one 4-dim subspace: a shared dictionary with s >= 4 is exact."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 48, generator=generator)
    weights = [torch.randn(out, 4, generator=generator) @ basis for out in (40, 56)]
    x = torch.randn(256, 48, generator=generator)
    grams = [x[:128].T @ x[:128] / 128, x[128:].T @ x[128:] / 128]
    config = DictionaryConfig(compression_ratio=0.5, **ONE_SHOT)
    results = compress_group(["a", "b"], weights, grams, config)
    assert results[0][0].dictionary is results[1][0].dictionary
    assert results[0][1].s >= 4
    for weight, (tensor, report) in zip(weights, results):
        assert torch.allclose(tensor.dequantize(), weight, atol=1e-4 * weight.abs().max())
        assert report.whitened_error < 1e-4


def test_grouped_tensors_match_an_independent_solve_of_the_stacked_whitened_weight():
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(out, 32, generator=generator) for out in (24, 40)]
    x = torch.randn(200, 32, generator=generator) * torch.linspace(0.2, 2.0, 32)
    grams = [x[:100].T @ x[:100] / 100, x[100:].T @ x[100:] / 100]
    config = DictionaryConfig(compression_ratio=0.3, gram_shrinkage=0.0, **ONE_SHOT)
    results = compress_group(["a", "b"], weights, grams, config)
    # reference: average the (unshrunk) Grams, whiten, stack along outputs, solve, map the atoms back
    whitening = whiten(torch.stack([g.double() for g in grams]).mean(0), config.damping)
    stacked = torch.cat(weights).double()
    budget = dictionary_budget(64, 32, 0.3, 2.0, 4)
    result = ksvd((whitening.factor @ stacked.T).float(), budget.k, budget.s, iterations=0, init="svd")
    reference = (
        torch.linalg.inv(whitening.factor)
        @ (result.dictionary @ codes_to_dense(result.indices, result.coefficients, budget.k)).double()
    ).T
    for (tensor, report), rows, gram, weight in zip(results, (slice(0, 24), slice(24, 64)), grams, weights):
        assert (report.k, report.s) == (budget.k, budget.s)
        assert torch.allclose(tensor.dequantize().double(), reference[rows], atol=1e-4)
        inputs = torch.randn(5, 32, generator=generator)
        assert torch.allclose(F.linear(inputs, tensor), inputs @ reference[rows].float().T, atol=1e-4)
        # the member's error is measured with its own Gram, not the averaged one
        damped = gram.double() + config.damping * torch.diagonal(gram).mean().double() * torch.eye(
            32, dtype=torch.float64
        )
        delta = weight.double() - reference[rows]
        own = float(((delta @ damped) * delta).sum() / ((weight.double() @ damped) * weight.double()).sum()) ** 0.5
        assert report.whitened_error == pytest.approx(own, rel=1e-3)
    assert sum(r.stored_bytes for _, r in results) == budget.stored_bytes


@pytest.mark.parametrize("grouping", ["paper", "inputs"])
def test_api_groups_share_one_dictionary_counted_once(grouping):
    model = tiny_llama(layers=2)
    report = sparsify_dictionary_(
        model,
        DictionaryConfig(compression_ratio=0.3, grouping=grouping, **ONE_SHOT),
        calibration=token_batches(3, 16),
        progress=False,
    )
    by_group: dict = {}
    for layer in report.layers:
        if layer.group is not None:
            by_group.setdefault(layer.group, []).append(layer.name)
    assert by_group and all(len(members) >= 2 for members in by_group.values())
    distinct = {}
    for members in by_group.values():
        dictionaries = {id(model.get_submodule(name).weight.dictionary) for name in members}
        assert len(dictionaries) == 1
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and isinstance(module.weight, DictionaryTensor):
            for inner in (module.weight.dictionary, module.weight.values, module.weight.bitmask):
                distinct[inner.untyped_storage().data_ptr()] = inner.numel() * inner.element_size()
    stats = spadi_ao.compression_stats(model)
    assert stats["compressed_stored_bytes"] == sum(distinct.values()) == report.stored_bytes
    assert report.compression_ratio >= 0.3
    assert stats["layers"][report.layers[0].name]["stored_bytes"] == report.layers[0].stored_bytes


def test_inputs_grouping_beats_per_layer_on_held_out_output_error():
    calibration, held_out = token_batches(8, 32, seed=1), token_batches(4, 32, seed=2)
    errors = {}
    for grouping in (None, "inputs"):
        model = tiny_llama()
        reference = tiny_llama()
        sparsify_dictionary_(
            model,
            DictionaryConfig(compression_ratio=0.4, grouping=grouping, **ONE_SHOT),
            calibration=calibration,
            progress=False,
        )
        targets = select_linears(reference)
        with GramCollector(targets) as collector:
            run_calibration(reference, held_out, progress=False)
        total = 0.0
        for name, module in targets.items():
            delta = (model.get_submodule(name).weight.dequantize() - module.weight.detach()).double()
            total += float(((delta @ collector.gram(name)) * delta).sum())
        errors[grouping] = total
    assert errors["inputs"] < errors[None]


def test_saved_groups_store_the_dictionary_once_and_reload_shared(tmp_path):
    model = tiny_llama(layers=2)
    sparsify_dictionary_(
        model,
        DictionaryConfig(compression_ratio=0.3, grouping="inputs", **ONE_SHOT),
        calibration=token_batches(2, 16),
        progress=False,
    )
    tensors, manifest = flatten_state_dict(model.state_dict())
    assert sum(key.endswith(".dictionary") for key in tensors) == 2 * 4  # per block: qkv, gate_up, o, down
    state = unflatten_state_dict(tensors, manifest)
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    assert q.dictionary is k.dictionary
    save_compressed(model, tmp_path / "grouped")
    loaded, _ = load_compressed(tmp_path / "grouped")
    attention = loaded.model.layers[1].self_attn
    assert attention.q_proj.weight.dictionary is attention.v_proj.weight.dictionary
    assert (
        spadi_ao.compression_stats(loaded)["compressed_stored_bytes"]
        == spadi_ao.compression_stats(model)["compressed_stored_bytes"]
    )
    ids = token_batches(1, 12)[0]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_average_gram_counts_each_member_once_and_returns_a_shared_gram_itself():
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(50, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    shared, other = a.T @ a, b.T @ b
    assert average_gram([shared, shared, shared]) is shared
    assert torch.allclose(average_gram([shared, other, other]), (shared + 2 * other) / 3, rtol=1e-13, atol=0)
    assert torch.equal(shared, a.T @ a)  # the inputs are left as they were
    assert average_gram([None, None]) is None
    with pytest.raises(ValueError, match="some layers of a group saw calibration data"):
        average_gram([shared, None])


def test_group_members_must_agree():
    with pytest.raises(ValueError, match="in_features"):
        sparsify_dictionary_(
            tiny_llama(),
            DictionaryConfig(grouping=lambda name: "all" if "mlp" in name else None, **ONE_SHOT),
            calibration=token_batches(1, 8),
            progress=False,
        )
    overrides = {r"layers\.0\.self_attn\.q_proj$": {"rho": 3.0}}
    with pytest.raises(ValueError, match="layer_overrides"):
        sparsify_dictionary_(
            tiny_llama(),
            DictionaryConfig(grouping="inputs", layer_overrides=overrides, **ONE_SHOT),
            calibration=token_batches(1, 8),
            progress=False,
        )
    with pytest.raises(ValueError, match="grouping"):
        DictionaryConfig(grouping="everything")


def test_a_quantised_shared_dictionary_is_quantised_once_and_stays_shared(tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig

    config = DictionaryConfig(
        compression_ratio=0.3,
        grouping="inputs",
        dictionary_quantization=Int8WeightOnlyConfig(set_inductor_config=False),
        values_dtype="int8",
        **ONE_SHOT,
    )
    model = tiny_llama(layers=1)
    report = sparsify_dictionary_(model, config, calibration=token_batches(2, 16), progress=False)
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.weight.dictionary is mlp.up_proj.weight.dictionary
    stats = spadi_ao.compression_stats(model)
    assert stats["compressed_stored_bytes"] == report.stored_bytes
    save_compressed(model, tmp_path / "q")
    loaded, _ = load_compressed(tmp_path / "q")
    assert spadi_ao.compression_stats(loaded)["compressed_stored_bytes"] == report.stored_bytes
    ids = token_batches(1, 12)[0]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-4)
