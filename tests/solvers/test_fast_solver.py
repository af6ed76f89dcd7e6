import pytest
import torch
from models import tiny_llama, token_batches

from spadi_ao import DictionaryConfig, sparsify_dictionary_
from spadi_ao.solvers.fast import fast_dictionary
from spadi_ao.solvers.ksvd import ksvd
from spadi_ao.solvers.omp import codes_to_dense


def _signals(n: int = 24, m: int = 60, seed: int = 0) -> torch.Tensor:
    """Columns mixing a few of many directions, plus noise: what a sparse dictionary is for."""
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n, 40, generator=generator)
    mask = torch.rand(40, m, generator=generator) < 0.15
    return atoms @ (torch.randn(40, m, generator=generator) * mask) + 0.05 * torch.randn(n, m, generator=generator)


def _error(signals, result, k):
    return float((signals - result.dictionary @ codes_to_dense(result.indices, result.coefficients, k)).pow(2).sum())


def test_objective_never_rises_and_starts_at_the_one_shot_svd_solution():
    signals = _signals()
    result = fast_dictionary(signals, k=16, s=6, steps=6)
    one_shot = ksvd(signals, 16, 6, iterations=0, init="svd")
    assert result.objective[0] == pytest.approx(_error(signals, one_shot, 16), rel=1e-5)
    assert result.objective[-1] < 0.9 * result.objective[0]
    assert _error(signals, result, 16) == pytest.approx(result.objective[-1], rel=1e-4)
    by_steps = [_error(signals, fast_dictionary(signals, k=16, s=6, steps=steps), 16) for steps in range(7)]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(by_steps, by_steps[1:])), by_steps


def test_format_exactly_s_distinct_atoms_per_column_and_unit_norm_atoms():
    signals = _signals(seed=1)
    result = fast_dictionary(signals, k=20, s=5, steps=3)
    assert result.dictionary.shape == (24, 20) and result.indices.shape == (60, 5) == result.coefficients.shape
    assert torch.allclose(result.dictionary.norm(dim=0), torch.ones(20), atol=1e-5)
    assert all(len(set(row.tolist())) == 5 for row in result.indices)


def test_codes_converge_to_least_squares_on_their_supports():
    """Independent reference: torch.linalg.lstsq per column on the chosen atoms."""
    signals = _signals(seed=2).double()
    result = fast_dictionary(signals, k=12, s=4, steps=2, cg_iterations=12)
    for column in range(signals.shape[1]):
        atoms = result.dictionary[:, result.indices[column]]
        reference = torch.linalg.lstsq(atoms, signals[:, column : column + 1]).solution.squeeze(1)
        assert torch.allclose(result.coefficients[column], reference, atol=1e-8, rtol=1e-6)


def test_dictionary_step_is_the_least_squares_dictionary():
    """One step with exact codes: the atoms minimise ||A - D C|| for the codes before the step."""
    signals = _signals(seed=3).double()
    zero = fast_dictionary(signals, k=10, s=3, steps=0)
    codes = codes_to_dense(zero.indices, zero.coefficients, 10)
    reference = torch.linalg.lstsq(codes.T, signals.T).solution.T  # argmin_D ||A - D C||
    best = float((signals - reference @ codes).pow(2).sum())
    one = fast_dictionary(signals, k=10, s=3, steps=1, cg_iterations=0)  # dictionary step only
    assert one.objective[-1] == pytest.approx(best, rel=1e-9)


def test_s_equal_k_and_validation():
    signals = _signals(n=8, m=10)
    full = fast_dictionary(signals, k=8, s=8, steps=2)
    assert full.objective[-1] < 1e-6 * float(signals.pow(2).sum())  # 8 atoms span R^8
    with pytest.raises(ValueError, match="1 <= s <= k"):
        fast_dictionary(signals, k=4, s=5)


@pytest.mark.parametrize("kwargs, field", [({"solver": "omp"}, "solver"), ({"fast_steps": -1}, "fast_steps")])
def test_config_rejects_bad_solver_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DictionaryConfig(**kwargs)


def test_fast_solver_through_the_api_beats_one_shot_on_every_layer():
    calibration = token_batches(4, 32)
    reports = {}
    for name, config in {
        "one-shot": DictionaryConfig(
            compression_ratio=0.4, solver="ksvd", iterations=0, allocation="uniform", grouping=None
        ),
        "fast": DictionaryConfig(
            compression_ratio=0.4, solver="fast", fast_steps=4, allocation="uniform", grouping=None
        ),
    }.items():
        model = tiny_llama()
        reports[name] = sparsify_dictionary_(model, config, calibration=calibration, progress=False)
    for one_shot, fast in zip(reports["one-shot"].layers, reports["fast"].layers):
        assert (fast.k, fast.s, fast.stored_bytes) == (one_shot.k, one_shot.s, one_shot.stored_bytes)
        assert fast.whitened_error < one_shot.whitened_error
