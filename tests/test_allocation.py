import itertools
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_llama, token_batches

import spadi_ao
from spadi_ao import DictionaryConfig, LowRankConfig, sparsify_dictionary_
from spadi_ao.allocation import (
    WEIGHT_FLOOR,
    atom_energy_blocks,
    candidate_sizes,
    output_sensitivity,
    output_weights,
    solve_knapsack,
    threshold_errors,
)
from spadi_ao.api import select_linears
from spadi_ao.calibration import GramCollector, run_calibration
from spadi_ao.layer import whiten_group
from spadi_ao.solvers.ksvd import ksvd
from spadi_ao.solvers.omp import codes_to_dense


def _brute_force(costs, errors, budget):
    feasible = [
        (sum(e[i] for e, i in zip(errors, pick)), pick)
        for pick in itertools.product(*(range(len(c)) for c in costs))
        if sum(c[i] for c, i in zip(costs, pick)) <= budget
    ]
    return min(feasible)[0]


_instances = st.integers(1, 4).flatmap(
    lambda units: st.tuples(
        st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=4), min_size=units, max_size=units),
        st.randoms(use_true_random=False),
        st.integers(0, 60),
    )
)


@settings(max_examples=150, deadline=None)
@given(_instances)
def test_knapsack_is_optimal_against_brute_force(instance):
    costs, rng, slack = instance
    errors = [[rng.uniform(0.0, 10.0) for _ in unit] for unit in costs]
    budget = sum(min(unit) for unit in costs) + slack
    picks = solve_knapsack(costs, errors, budget)
    assert sum(c[i] for c, i in zip(costs, picks)) <= budget
    assert sum(e[i] for e, i in zip(errors, picks)) == pytest.approx(_brute_force(costs, errors, budget), abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(_instances, st.integers(1, 16))
def test_quantised_knapsack_never_exceeds_the_budget(instance, max_bins):
    costs, rng, slack = instance
    costs = [[1000 * c + rng.randrange(1000) for c in unit] for unit in costs]
    errors = [[rng.uniform(0.0, 10.0) for _ in unit] for unit in costs]
    budget = sum(min(unit) for unit in costs) + 1000 * slack
    try:
        picks = solve_knapsack(costs, errors, budget, max_bins=max_bins)
    except ValueError as error:  # coarse quanta may round every choice above the budget
        assert "quanta" in str(error)
        return
    assert sum(c[i] for c, i in zip(costs, picks)) <= budget


def test_knapsack_rejects_an_impossible_budget():
    with pytest.raises(ValueError, match="below the cheapest"):
        solve_knapsack([[5, 7], [3]], [[1.0, 0.0], [0.0]], budget=7)


@pytest.mark.parametrize("shape", [(20, 30), (30, 20)], ids=["wide", "tall"])
def test_threshold_errors_equal_the_one_shot_solutions(shape):
    """Independent reference: K-SVD with 0 iterations (SVD atoms, exact OMP) and SVD-LLM's truncation."""
    generator = torch.Generator().manual_seed(0)
    signals = torch.randn(*shape, generator=generator, dtype=torch.float64)
    weights = torch.rand(shape[1], generator=generator, dtype=torch.float64)
    sizes = [(4, 2), (8, 3), (12, 6), (6, 6)]
    errors = threshold_errors(signals, sizes, weights)
    for (k, s), error in zip(sizes, errors):
        result = ksvd(signals, k, s, iterations=0, init="svd")
        residual = signals - result.dictionary @ codes_to_dense(result.indices, result.coefficients, k)
        assert error == pytest.approx(float((residual.pow(2).sum(0) * weights).sum()), rel=1e-9)
    sigma = torch.linalg.svdvals(signals)
    assert threshold_errors(signals, [(5, 5)])[0] == pytest.approx(float(sigma[5:].pow(2).sum()), rel=1e-9)


@pytest.mark.parametrize("block_elements", [1 << 22, 1000], ids=["one-block", "blocks"])
@pytest.mark.parametrize("shape", [(48, 200), (200, 48)], ids=["wide", "tall"])
def test_atom_energies_match_a_float64_svd(shape, block_elements, monkeypatch):
    """The Gram route on a float32 weight against float64 SVD coefficients: same energies, every row summing to
    its column's squared norm, and errors accurate where the float32 SVD's ``total - kept`` cancels; in one
    block of columns or in many."""
    monkeypatch.setattr("spadi_ao.solvers.codes.BLOCK_ELEMENTS", block_elements)
    generator = torch.Generator().manual_seed(1)
    decay = torch.logspace(0, -3, min(shape))
    left = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=generator, dtype=torch.float64)).Q
    signals = (left * decay) @ right.T
    _, sigma, vh = torch.linalg.svd(signals, full_matrices=False)
    reference = (sigma.unsqueeze(1) * vh).pow(2).T
    blocks = list(atom_energy_blocks(signals.float()))
    assert [block.start for block, _ in blocks] == list(range(0, shape[1], blocks[0][0].stop))
    assert (len(blocks) > 1) == (block_elements == 1000)
    energies = torch.cat([block_energies for _, block_energies in blocks])
    assert energies.dtype == torch.float64 and energies.shape == reference.shape
    torch.testing.assert_close(energies, reference, atol=1e-6 * float(reference.max()), rtol=0)
    torch.testing.assert_close(energies.sum(1), signals.float().double().pow(2).sum(0), rtol=1e-9, atol=0)
    # a near-lossless size: the error is 1e-6 of the total energy, far below float32's cancellation
    k = min(shape) - 2
    error = threshold_errors(signals.float(), [(k, k), (min(shape) + 5, 4)])
    assert error[0] == pytest.approx(float(sigma[k:].pow(2).sum()), rel=1e-4)
    assert error[1] == pytest.approx(float((reference.sum(1) - reference.topk(4, dim=1).values.sum(1)).sum()), rel=1e-6)


def test_output_sensitivity_is_the_mean_squared_output_gradient():
    model = tiny_llama()
    batches = token_batches(2, 12)
    name = "model.layers.1.mlp.up_proj"
    module = model.get_submodule(name)
    sensitivity = output_sensitivity(model, {name: module}, batches)[name]
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    captured = []

    def keep(module, args, out):
        out.retain_grad()
        captured.append(out)

    handle = module.register_forward_hook(keep)
    for batch in batches:
        model(batch, labels=batch).loss.backward()
    handle.remove()
    gradients = torch.cat([out.grad.reshape(-1, out.shape[-1]) for out in captured]).double()
    assert torch.allclose(sensitivity, gradients.pow(2).mean(0), rtol=1e-4, atol=1e-20)


def test_the_knapsack_gathers_its_grams_in_the_loss_pass():
    """One forward per calibration batch, and the result of separate inference-mode Grams with the same sensitivity."""
    model, reference = tiny_llama(), tiny_llama()
    batches = token_batches(3, 16)
    forwards = []
    handle = model.register_forward_hook(lambda module, args, output: forwards.append(torch.is_grad_enabled()))
    sparsify_dictionary_(model, DictionaryConfig(), calibration=batches, progress=False)
    handle.remove()
    assert forwards == [True] * len(batches)
    sensitivity = output_sensitivity(reference, select_linears(reference), batches)
    sparsify_dictionary_(reference, DictionaryConfig(), calibration=batches, sensitivity=sensitivity, progress=False)
    for (name, weight), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        assert type(weight) is type(expected) and torch.equal(weight.dequantize(), expected.dequantize()), name


def test_candidate_sizes_drop_infeasible_ratios():
    sizes = candidate_sizes(DictionaryConfig(), 8, 8, 4, (0.3, 0.99))
    assert [c.ratio for c in sizes] == [0.3]
    assert sizes[0].stored_bytes <= 0.7 * 8 * 8 * 4
    low_rank = candidate_sizes(LowRankConfig(), 64, 32, 4, (0.5,))[0]
    assert low_rank.k == low_rank.s == 10 and low_rank.stored_bytes == 10 * 96 * 4


def _mlp_filter(module, name):
    return name.startswith("model.layers.0.mlp.")


@pytest.mark.parametrize("config_type", [DictionaryConfig, LowRankConfig])
def test_api_allocation_is_the_brute_force_optimum_and_meets_the_budget(config_type):
    """Three layers, four candidates: the API's picks equal brute force over independently computed errors."""
    candidates = (0.2, 0.35, 0.5, 0.65)
    extra = {"solver": "ksvd", "iterations": 0, "grouping": None} if config_type is DictionaryConfig else {}
    config = config_type(
        compression_ratio=0.4, allocation="knapsack", allocation_candidates=candidates, gram_shrinkage=0.0, **extra
    )
    batches = token_batches(3, 16)
    model = tiny_llama()
    targets = select_linears(model, _mlp_filter)
    generator = torch.Generator().manual_seed(1)
    sensitivity = {
        name: torch.rand(m.out_features, generator=generator, dtype=torch.float64) + 0.1 for name, m in targets.items()
    }
    with GramCollector(targets) as collector:
        run_calibration(model, batches, progress=False)
    costs, errors = [], []
    for name, module in targets.items():
        menu = candidate_sizes(config, module.out_features, module.in_features, 4, candidates)
        _, whitened, _ = whiten_group([module.weight.detach()], [collector.gram(name)], config)
        row_costs, row_errors = [], []
        for candidate in menu:
            if config_type is DictionaryConfig:
                result = ksvd(whitened, candidate.k, candidate.s, iterations=0, init="svd")
                approximation = result.dictionary @ codes_to_dense(result.indices, result.coefficients, candidate.k)
            else:
                u, sigma, vh = torch.linalg.svd(whitened, full_matrices=False)
                approximation = (u[:, : candidate.k] * sigma[: candidate.k]) @ vh[: candidate.k]
            residual = (whitened - approximation).double().pow(2).sum(0)
            row_costs.append(candidate.stored_bytes)
            row_errors.append(float((residual * sensitivity[name]).sum()))
        costs.append(row_costs)
        errors.append(row_errors)
    dense = sum(m.weight.numel() * 4 for m in targets.values())
    budget = int(0.6 * dense)
    best = _brute_force(costs, errors, budget)

    report = sparsify_dictionary_(
        model, config, filter_fn=_mlp_filter, calibration=collector, sensitivity=sensitivity, progress=False
    )
    chosen = []
    for layer, row_costs in zip(report.layers, costs):
        assert layer.stored_bytes in row_costs
        chosen.append(row_costs.index(layer.stored_bytes))
    achieved = sum(e[i] for e, i in zip(errors, chosen))
    assert achieved == pytest.approx(best, rel=1e-4)
    assert report.stored_bytes <= budget and report.compression_ratio >= 0.4
    assert spadi_ao.compression_stats(model)["compressed_stored_bytes"] == report.stored_bytes


def test_whole_model_budget_is_met_tightly_and_pinned_layers_keep_their_ratio():
    config = DictionaryConfig(
        compression_ratio=0.35,
        allocation="knapsack",
        solver="ksvd",
        iterations=0,
        grouping=None,
        layer_overrides={r"layers\.0\.self_attn\.o_proj$": {"compression_ratio": 0.5}},
    )
    model = tiny_llama()
    report = sparsify_dictionary_(model, config, calibration=token_batches(3, 16), progress=False)
    budget = int(0.65 * report.dense_bytes)
    assert report.stored_bytes <= budget
    assert report.compression_ratio >= 0.35
    # Tight: no layer could take its next larger candidate and still fit.
    upgrades = []
    for layer in report.layers:
        if layer.name == "model.layers.0.self_attn.o_proj":
            continue
        menu = candidate_sizes(
            config.for_layer(layer.name), layer.out_features, layer.in_features, 4, config.allocation_candidates
        )
        larger = [c.stored_bytes - layer.stored_bytes for c in menu if c.stored_bytes > layer.stored_bytes]
        upgrades += larger[-1:] if larger else []
    assert budget - report.stored_bytes < min(upgrades)
    pinned = next(layer for layer in report.layers if layer.name == "model.layers.0.self_attn.o_proj")
    assert pinned.stored_bytes == candidate_sizes(config, 64, 64, 4, (0.5,))[0].stored_bytes
    assert len({round(layer.compression_ratio, 2) for layer in report.layers}) > 2  # not uniform


def test_knapsack_without_batches_weighs_every_output_alike(caplog):
    """A prepared collector (or no calibration) gives no loss to differentiate: unit output weights, one warning."""
    model, explicit = tiny_llama(), tiny_llama()
    collectors = []
    for candidate in (model, explicit):
        with GramCollector(select_linears(candidate)) as collector:
            run_calibration(candidate, token_batches(2, 16), progress=False)
        collectors.append(collector)
    with caplog.at_level(logging.WARNING, logger="spadi_ao.allocation_driver"):
        report = sparsify_dictionary_(
            model, DictionaryConfig(allocation="knapsack"), calibration=collectors[0], progress=False
        )
    assert sum("weighing every output alike" in record.getMessage() for record in caplog.records) == 1
    ones = {name: torch.ones(module.out_features) for name, module in select_linears(explicit).items()}
    sparsify_dictionary_(
        explicit, DictionaryConfig(allocation="knapsack"), calibration=collectors[1], sensitivity=ones, progress=False
    )
    for (name, weight), reference in zip(model.state_dict().items(), explicit.state_dict().values()):
        assert type(weight) is type(reference) and torch.equal(weight.dequantize(), reference.dequantize()), name
    assert report.compression_ratio >= 0.3 and len({round(layer.compression_ratio, 2) for layer in report.layers}) > 1
    assert sparsify_dictionary_(tiny_llama(), DictionaryConfig(), progress=False).compression_ratio >= 0.3  # data-free


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"allocation": "greedy"}, "allocation"),
        ({"allocation_candidates": ()}, "allocation_candidates"),
        ({"allocation_candidates": (0.3, 1.2)}, "allocation_candidates"),
        ({"allocation_candidates": [0.3]}, "allocation_candidates"),
        ({"output_weighting": "fisher"}, "output_weighting"),
    ],
)
def test_config_rejects_bad_allocation_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DictionaryConfig(**kwargs)


def test_output_weights_are_sensitivities_over_the_units_mean_with_a_floor():
    first, second = torch.tensor([4.0, 0.0, 2.0]), torch.tensor([6.0])
    weights = output_weights([first, second])
    assert torch.allclose(weights, torch.tensor([4 / 3, WEIGHT_FLOOR, 2 / 3, 2.0], dtype=torch.float64))
    assert torch.equal(output_weights([torch.zeros(3)]), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="sensitivities"):
        output_weights([torch.tensor([1.0, -1.0])])
