"""The COMPOT-style solver: orthonormal atoms by Procrustes, hard-thresholded codes; against dense math."""

from itertools import combinations

import pytest
import torch
from models import tiny_llama, token_batches

import spadi_ao.layer as layer
from spadi_ao import DictionaryConfig, sparsify_dictionary_
from spadi_ao.budget import dictionary_budget
from spadi_ao.solvers.codes import threshold_codes
from spadi_ao.solvers.omp import codes_to_dense
from spadi_ao.solvers.procrustes import procrustes_dictionary, procrustes_update


def _signals(n: int = 24, m: int = 60, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n, 40, generator=generator, dtype=torch.float64)
    mask = torch.rand(40, m, generator=generator) < 0.15
    return atoms @ (torch.randn(40, m, generator=generator, dtype=torch.float64) * mask) + 0.05 * torch.randn(
        n, m, generator=generator, dtype=torch.float64
    )


def _error(signals: torch.Tensor, dictionary: torch.Tensor, indices: torch.Tensor, coefficients: torch.Tensor) -> float:
    return float((signals - dictionary @ codes_to_dense(indices, coefficients, dictionary.shape[1])).pow(2).sum())


def test_objective_is_the_dense_error_and_never_rises():
    signals = _signals()
    errors = []
    for iterations in range(6):
        result = procrustes_dictionary(signals, k=16, s=5, iterations=iterations, tolerance=0.0)
        dense = _error(signals, result.dictionary, result.indices, result.coefficients)
        assert result.objective[-1] == pytest.approx(dense, rel=1e-9)
        errors.append(dense)
    full = procrustes_dictionary(signals, k=16, s=5, iterations=5, tolerance=0.0).objective
    assert all(b <= a * (1 + 1e-12) for a, b in zip(full, full[1:]))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 0.95 * errors[0]  # the iterations do something on this signal


def test_dictionary_is_orthonormal_also_beyond_the_signal_rank():
    signals = _signals(n=20, m=60, seed=1)
    result = procrustes_dictionary(signals, k=12, s=4, iterations=3)
    assert torch.allclose(result.dictionary.T @ result.dictionary, torch.eye(12, dtype=torch.float64), atol=1e-10)
    low_rank = _signals(n=20, m=6, seed=2)  # rank 6 < k = 10: the start is completed orthonormally
    result = procrustes_dictionary(low_rank, k=10, s=3, iterations=2)
    assert torch.allclose(result.dictionary.T @ result.dictionary, torch.eye(10, dtype=torch.float64), atol=1e-10)


def test_codes_are_the_exhaustive_best_s_selection():
    """Every s-subset of atoms, least squares on it: thresholding picks the minimum for orthonormal atoms."""
    signals = _signals(n=7, m=12, seed=3)
    dictionary = procrustes_dictionary(signals, k=5, s=2, iterations=2).dictionary
    indices, coefficients = threshold_codes(dictionary, signals, 2)
    for column in range(signals.shape[1]):
        target = signals[:, column]
        best = min(
            (
                float(
                    (
                        target
                        - dictionary[:, list(subset)] @ torch.linalg.lstsq(dictionary[:, list(subset)], target).solution
                    )
                    .pow(2)
                    .sum()
                ),
                subset,
            )
            for subset in combinations(range(5), 2)
        )
        chosen = dictionary[:, indices[column]] @ coefficients[column]
        assert float((target - chosen).pow(2).sum()) == pytest.approx(best[0], rel=1e-9, abs=1e-12)
        assert set(indices[column].tolist()) == set(best[1])


def test_dictionary_step_beats_every_other_orthonormal_dictionary():
    """Fixed codes: U V^T of A C^T against random orthonormal matrices and small rotations of itself."""
    signals = _signals(n=10, m=30, seed=4)
    start = procrustes_dictionary(signals, k=6, s=3, iterations=0)
    codes = codes_to_dense(start.indices, start.coefficients, 6)
    best = procrustes_update(signals, start.indices, start.coefficients, 6)
    value = float((signals - best @ codes).pow(2).sum())
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        random = torch.linalg.qr(torch.randn(10, 6, generator=generator, dtype=torch.float64)).Q
        assert value <= float((signals - random @ codes).pow(2).sum())
        skew = 1e-3 * torch.randn(10, 10, generator=generator, dtype=torch.float64)
        rotated = torch.linalg.matrix_exp(skew - skew.T) @ best
        assert value <= float((signals - rotated @ codes).pow(2).sum()) + 1e-12


def test_refits_keep_the_supports_never_raise_the_error_and_end_at_least_squares_codes():
    """After the orthonormal rounds, refits on the same supports: the error falls monotonically from the
    orthonormal solution's, atoms have unit norm, and each column's codes are its least-squares fit on its atoms
    (torch.linalg.lstsq as the independent reference)."""
    signals = _signals(seed=5)
    plain = procrustes_dictionary(signals, k=12, s=4, iterations=5, tolerance=0.0)
    refit = procrustes_dictionary(signals, k=12, s=4, iterations=5, tolerance=0.0, refit_steps=6)
    assert refit.objective[: len(plain.objective)] == plain.objective
    assert refit.objective[-1] < 0.98 * plain.objective[-1]
    by_steps = [
        procrustes_dictionary(signals, k=12, s=4, iterations=5, tolerance=0.0, refit_steps=steps).objective[-1]
        for steps in range(7)
    ]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(by_steps, by_steps[1:])), by_steps
    assert refit.objective[-1] == pytest.approx(
        _error(signals, refit.dictionary, refit.indices, refit.coefficients), rel=1e-9
    )
    assert torch.equal(refit.indices.sort(dim=1).values, plain.indices.sort(dim=1).values)
    assert torch.allclose(refit.dictionary.norm(dim=0), torch.ones(12, dtype=torch.float64), atol=1e-12)
    converged = procrustes_dictionary(signals, k=12, s=4, iterations=5, tolerance=0.0, refit_steps=40)
    for column in range(signals.shape[1]):
        atoms = converged.dictionary[:, converged.indices[column]]
        reference = torch.linalg.lstsq(atoms, signals[:, column : column + 1]).solution.squeeze(1)
        assert torch.allclose(converged.coefficients[column], reference, atol=1e-6, rtol=1e-4)


def test_validation():
    signals = _signals(n=6, m=10)
    with pytest.raises(ValueError, match="k <= n"):
        procrustes_dictionary(signals, k=7, s=2)
    with pytest.raises(ValueError, match="1 <= s <= k"):
        procrustes_dictionary(signals, k=4, s=5)
    with pytest.raises(ValueError, match="iterations"):
        procrustes_dictionary(signals, k=4, s=2, iterations=-1)
    with pytest.raises(ValueError, match="refit_steps"):
        procrustes_dictionary(signals, k=4, s=2, refit_steps=-1)
    with pytest.raises(ValueError, match="solver"):
        DictionaryConfig(solver="orthogonal")
    assert DictionaryConfig(solver="procrustes").solver == "procrustes"


def test_budget_caps_atoms_at_the_inputs_and_spends_the_rest_on_codes():
    uncapped = dictionary_budget(3072, 64, 0.1, 2.0, 4)
    assert uncapped.k > 64
    capped = dictionary_budget(3072, 64, 0.1, 2.0, 4, max_atoms=64)
    assert capped.k == 64 and capped.s > round(64 / 2.0)
    assert capped.stored_bytes <= 0.9 * capped.dense_bytes
    assert capped.s <= capped.k


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (160, 16)])
def test_layer_result_is_the_dense_reconstruction(shape):
    """The stored tensor decodes to U^-1 D C, and the report's error is that weight's output error."""
    generator = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(*shape, generator=generator)
    inputs = torch.randn(4 * shape[1], shape[1], generator=generator) * torch.logspace(0, -1.5, shape[1])
    gram = inputs.double().T @ inputs.double()
    config = DictionaryConfig(compression_ratio=0.1, solver="procrustes", iterations=4, gram_shrinkage=0.0)
    tensor, report = layer.compress_weight("layer", weight, gram.clone(), config)
    assert report.k <= shape[1] and report.stored_bytes <= 0.9 * report.dense_bytes
    whitening = layer.whitening_for(gram, shape[1], config.damping, 0.0, weight.device)
    whitened = layer._whitened_weight(whitening, [weight])
    result = procrustes_dictionary(
        whitened, report.k, report.s, iterations=4, seed=config.seed, refit_steps=config.fast_steps
    )
    approximation = (result.dictionary @ codes_to_dense(result.indices, result.coefficients, report.k)).double()
    dense = torch.linalg.solve(whitening.factor, approximation).T
    assert torch.allclose(tensor.dequantize().double(), dense, atol=1e-5, rtol=1e-4)
    exact = whitening.apply(weight.double().T)
    error = float((exact - whitening.apply(tensor.dequantize().double().T)).norm() / exact.norm())
    assert report.whitened_error == pytest.approx(error, rel=1e-4)


def test_through_the_api_with_knapsack_and_groups():
    calibration = token_batches(4, 32)
    model = tiny_llama()
    config = DictionaryConfig(
        compression_ratio=0.4, solver="procrustes", iterations=3, allocation="knapsack", grouping="inputs"
    )
    report = sparsify_dictionary_(model, config, calibration=calibration, progress=False)
    assert report.compression_ratio >= 0.4 - 1e-9
    assert all(layer_report.k <= layer_report.in_features for layer_report in report.layers)
