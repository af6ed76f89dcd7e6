import pytest
import torch

from spadi_ao.solvers.ksvd import ksvd, leading_left_singular_vectors, svd_dictionary
from spadi_ao.solvers.omp import codes_to_dense


def _structured_signals(n: int, m: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    return mixing @ torch.randn(n, m, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("init", ["random-columns", "svd"])
@pytest.mark.parametrize("atoms_per_step", [1, 4])
def test_objective_never_increases(init, atoms_per_step):
    signals = _structured_signals(24, 60, 0)
    result = ksvd(
        signals, k=16, s=8, iterations=6, power_iterations=8, seed=42, init=init, atoms_per_step=atoms_per_step
    )
    objective = torch.tensor(result.objective)
    assert (objective[1:] <= objective[:-1] * (1 + 1e-12) + 1e-12).all(), result.objective
    assert objective[-1] < objective[0]


def test_result_is_consistent_and_atoms_unit_norm():
    signals = _structured_signals(16, 40, 1)
    result = ksvd(signals, k=12, s=5, iterations=3, seed=42)
    assert torch.allclose(result.dictionary.norm(dim=0), torch.ones(12, dtype=torch.float64), atol=1e-10)
    assert result.indices.shape == (40, 5) and result.coefficients.shape == (40, 5)
    assert all(len(set(row.tolist())) == 5 for row in result.indices)
    approximation = result.dictionary @ codes_to_dense(result.indices, result.coefficients, 12)
    assert (signals - approximation).pow(2).sum().item() == pytest.approx(result.objective[-1], rel=1e-9)


def test_seed_makes_it_deterministic():
    signals = _structured_signals(16, 30, 2)
    a = ksvd(signals, k=10, s=4, iterations=2, seed=7, init="random-columns")
    b = ksvd(signals, k=10, s=4, iterations=2, seed=7, init="random-columns")
    assert torch.equal(a.dictionary, b.dictionary) and torch.equal(a.indices, b.indices)


def test_learns_a_planted_dictionary():
    """Signals built from a hidden dictionary: K-SVD fits them far better than an SVD with as many numbers."""
    generator = torch.Generator().manual_seed(3)
    n, k, s, m = 20, 30, 3, 400
    hidden = torch.randn(n, k, generator=generator, dtype=torch.float64)
    hidden /= hidden.norm(dim=0)
    supports = torch.stack([torch.randperm(k, generator=generator)[:s] for _ in range(m)])
    signals = hidden @ codes_to_dense(supports, torch.randn(m, s, generator=generator, dtype=torch.float64), k)
    result = ksvd(signals, k=k, s=s, iterations=30, seed=42, init="random-columns")
    relative = (result.objective[-1] / signals.pow(2).sum().item()) ** 0.5
    rank = (k * n + s * m) // (n + m)  # same count of stored values as dictionary + codes
    singular = torch.linalg.svdvals(signals)
    low_rank_relative = (singular[rank:].pow(2).sum() / singular.pow(2).sum()).sqrt().item()
    assert relative < 0.3 * low_rank_relative


def _planted(n: int, m: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 signals with known left singular vectors (float64) and a spectrum spanning four decades."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=torch.float64))
    spectrum = torch.logspace(0, -4, rank, dtype=torch.float64)
    return ((left * spectrum) @ right.T).float(), left


@pytest.mark.parametrize("n, m", [(40, 130), (130, 40), (64, 64)])
def test_leading_left_singular_vectors_match_the_planted_ones(n, m):
    """Wide, tall and square: the Gram route finds the exact leading vectors (up to sign), orthonormal,
    at least as accurately as LAPACK's float32 SVD."""
    signals, exact = _planted(n, m, min(n, m), seed=n + m)
    count = min(n, m) // 2
    found = leading_left_singular_vectors(signals, count).double()
    reference = torch.linalg.svd(signals, full_matrices=False)[0][:, :count].double()
    alignment = (exact[:, :count].T @ found).diagonal().abs()
    reference_alignment = (exact[:, :count].T @ reference).diagonal().abs()
    assert found.shape == (n, count)
    assert (1 - alignment).max() <= max(1e-5, 2 * (1 - reference_alignment).max())
    assert torch.allclose(found.T @ found, torch.eye(count, dtype=torch.float64), atol=1e-5)


def test_tall_rank_deficient_signals_stop_at_their_rank_and_svd_dictionary_fills_the_rest():
    signals, exact = _planted(50, 20, 6, seed=5)
    found = leading_left_singular_vectors(signals, 10)
    assert found.shape == (50, 6)
    assert torch.allclose((exact.T @ found.double()).abs(), torch.eye(6, dtype=torch.float64), atol=1e-4)
    dictionary = svd_dictionary(signals, 10, torch.Generator().manual_seed(0))
    assert dictionary.shape == (50, 10)
    assert torch.equal(dictionary[:, :6], found)
    assert torch.allclose(dictionary.norm(dim=0), torch.ones(10), atol=1e-6)
