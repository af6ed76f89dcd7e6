import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spadi_ao.solvers.omp import batched_omp, codes_to_dense, least_squares_codes


def _unit_dictionary(n: int, k: int, seed: int) -> torch.Tensor:
    d = torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return d / d.norm(dim=0)


def _reference_omp(dictionary: torch.Tensor, signal: torch.Tensor, s: int) -> tuple[list[int], torch.Tensor]:
    """Textbook OMP: explicit residual, lstsq on the support every step."""
    support: list[int] = []
    residual = signal.clone()
    for _ in range(s):
        scores = (dictionary.T @ residual).abs()
        scores[support] = -1.0
        support.append(int(scores.argmax()))
        coefficients = torch.linalg.lstsq(dictionary[:, support], signal).solution
        residual = signal - dictionary[:, support] @ coefficients
    return support, coefficients


def _spikes_and_sines(n: int) -> torch.Tensor:
    """``[I, H / sqrt(n)]`` (Sylvester Hadamard): unit atoms with mutual coherence exactly ``1 / sqrt(n)``."""
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < n:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    return torch.cat([torch.eye(n, dtype=torch.float64), hadamard / n**0.5], dim=1)


def test_recovers_exact_support_of_incoherent_dictionary():
    # Tropp (2004): OMP recovers every s-sparse signal exactly when mu * (2s - 1) < 1.
    n, s, m = 256, 4, 300
    dictionary = _spikes_and_sines(n)
    k = dictionary.shape[1]
    coherence = (dictionary.T @ dictionary - torch.eye(k, dtype=torch.float64)).abs().max()
    assert coherence * (2 * s - 1) < 1.0
    generator = torch.Generator().manual_seed(1)
    supports = torch.stack([torch.randperm(k, generator=generator)[:s] for _ in range(m)])
    magnitudes = 1.0 + torch.rand(m, s, dtype=torch.float64, generator=generator)
    signs = torch.randint(0, 2, (m, s), generator=generator).to(torch.float64) * 2 - 1
    signals = dictionary @ codes_to_dense(supports, magnitudes * signs, k)
    indices, coefficients = batched_omp(dictionary, signals, s)
    assert torch.equal(indices.sort(dim=1).values, supports.sort(dim=1).values)
    assert torch.allclose(
        codes_to_dense(indices, coefficients, k), codes_to_dense(supports, magnitudes * signs, k), atol=1e-9
    )


@given(n=st.integers(4, 24), k=st.integers(2, 30), m=st.integers(1, 12), seed=st.integers(0, 10_000), data=st.data())
@settings(max_examples=40, deadline=None)
def test_matches_textbook_omp(n, k, m, seed, data):
    s = data.draw(st.integers(1, min(k, n)))
    dictionary = _unit_dictionary(n, k, seed)
    signals = torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 7))
    indices, coefficients = batched_omp(dictionary, signals, s)
    for column in range(m):
        support, reference = _reference_omp(dictionary, signals[:, column], s)
        assert indices[column].tolist() == support
        assert torch.allclose(coefficients[column], reference, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("atoms_per_step", [2, 3, 8])
def test_generalised_omp_codes_exactly_s_atoms_with_least_squares_values(atoms_per_step):
    n, k, s, m = 20, 30, 7, 25
    dictionary = _unit_dictionary(n, k, 3)
    signals = torch.randn(n, m, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    indices, coefficients = batched_omp(dictionary, signals, s, atoms_per_step=atoms_per_step)
    assert indices.shape == (m, s)
    assert all(len(set(row.tolist())) == s for row in indices)
    assert torch.allclose(coefficients, least_squares_codes(dictionary, signals, indices), atol=1e-8)


def test_least_squares_codes_is_optimal_by_exhaustive_check():
    n, k, s = 6, 5, 2
    dictionary = _unit_dictionary(n, k, 5)
    signal = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def residual_energy(columns):
        atoms = dictionary[:, list(columns)]
        fitted = atoms @ torch.linalg.pinv(atoms) @ signal
        return (signal - fitted).pow(2).sum().item()

    best = min((residual_energy(c), c) for c in itertools.combinations(range(k), s))
    indices = torch.tensor([best[1]])
    coefficients = least_squares_codes(dictionary, signal, indices)
    residual = signal[:, 0] - dictionary[:, list(best[1])] @ coefficients[0]
    assert residual.pow(2).sum().item() == pytest.approx(best[0], rel=1e-8, abs=1e-12)


def test_dependent_atoms_do_not_crash():
    base = _unit_dictionary(3, 2, 0)
    dictionary = torch.cat([base, base], dim=1)  # every atom duplicated
    signals = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    indices, coefficients = batched_omp(dictionary, signals, 3)
    assert torch.isfinite(coefficients).all()
    assert all(len(set(row.tolist())) == 3 for row in indices)


def test_bad_sparsity_raises():
    with pytest.raises(ValueError, match="s must be"):
        batched_omp(_unit_dictionary(4, 3, 0), torch.randn(4, 2, dtype=torch.float64), 4)


def test_orthonormal_dictionary_shortcut_equals_textbook_omp():
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8)))
    dictionary = q[:, :9]
    signals = torch.randn(12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    indices, coefficients = batched_omp(dictionary, signals, 4)
    for column in range(6):
        support, reference = _reference_omp(dictionary, signals[:, column], 4)
        assert indices[column].tolist() == support
        assert torch.allclose(coefficients[column], reference, atol=1e-10)
