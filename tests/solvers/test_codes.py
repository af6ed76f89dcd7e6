"""Blockwise sparse-code helpers against dense math, and the solvers' results independent of the block size."""

import pytest
import torch

from spadi_ao.solvers.codes import (
    column_blocks,
    sparse_code_products,
    sparse_squared_error,
    squared_norm,
    threshold_codes,
)
from spadi_ao.solvers.fast import fast_dictionary
from spadi_ao.solvers.omp import codes_to_dense
from spadi_ao.solvers.procrustes import procrustes_dictionary

SMALL_BLOCKS = 200  # a few columns per block on the shapes below


def _problem(n: int = 16, m: int = 90, k: int = 12, s: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    signals = torch.randn(n, m, generator=generator, dtype=torch.float64)
    dictionary = torch.randn(n, k, generator=generator, dtype=torch.float64)
    indices = torch.stack([torch.randperm(k, generator=generator)[:s] for _ in range(m)])
    coefficients = torch.randn(m, s, generator=generator, dtype=torch.float64)
    return signals, dictionary, indices, coefficients


def test_column_blocks_cover_every_column_once(monkeypatch):
    monkeypatch.setattr("spadi_ao.solvers.codes.BLOCK_ELEMENTS", 100)
    blocks = column_blocks(47, 9)  # 11 columns a block
    assert [(b.start, b.stop) for b in blocks] == [(0, 11), (11, 22), (22, 33), (33, 44), (44, 47)]
    assert column_blocks(5, 1000) == [slice(i, i + 1) for i in range(5)]  # at least one column a block


def test_products_and_error_match_dense_codes(monkeypatch):
    monkeypatch.setattr("spadi_ao.solvers.codes.BLOCK_ELEMENTS", SMALL_BLOCKS)
    signals, dictionary, indices, coefficients = _problem()
    codes = codes_to_dense(indices, coefficients, 12)  # (k, m)
    cross, gram = sparse_code_products(signals, indices, coefficients, 12, torch.float64, with_gram=True)
    torch.testing.assert_close(cross, signals @ codes.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram, codes @ codes.T, rtol=1e-12, atol=1e-12)
    assert sparse_code_products(signals, indices, coefficients, 12, torch.float64)[1] is None
    dense_error = float((signals - dictionary @ codes).pow(2).sum())
    assert sparse_squared_error(signals, dictionary, indices, coefficients) == pytest.approx(dense_error, rel=1e-12)
    assert squared_norm(signals.float()) == pytest.approx(float(signals.float().double().pow(2).sum()), rel=1e-12)


def test_threshold_codes_keep_the_largest_correlations(monkeypatch):
    monkeypatch.setattr("spadi_ao.solvers.codes.BLOCK_ELEMENTS", SMALL_BLOCKS)
    signals, dictionary, _, _ = _problem(seed=1)
    indices, coefficients = threshold_codes(dictionary, signals, 3)
    correlations = dictionary.T @ signals  # (k, m)
    for column in range(signals.shape[1]):  # exhaustive: the kept set is the 3 largest magnitudes
        largest = correlations[:, column].abs().argsort(descending=True)[:3]
        assert sorted(indices[column].tolist()) == sorted(largest.tolist())
        torch.testing.assert_close(coefficients[column], correlations[indices[column], column])


@pytest.mark.parametrize("solver", ["fast", "procrustes"])
def test_solvers_do_not_depend_on_the_block_size(solver, monkeypatch):
    """One block of columns against many: the same supports, and the same dictionary and codes to rounding."""
    signals = _problem(n=20, m=150, seed=2)[0].float()

    def solve():
        if solver == "fast":
            return fast_dictionary(signals, k=14, s=5, steps=3)
        return procrustes_dictionary(signals, k=14, s=5, iterations=3, tolerance=0.0)

    whole = solve()
    monkeypatch.setattr("spadi_ao.solvers.codes.BLOCK_ELEMENTS", SMALL_BLOCKS)
    assert len(column_blocks(150, 14)) > 5
    blocked = solve()
    assert torch.equal(whole.indices, blocked.indices)
    torch.testing.assert_close(blocked.dictionary, whole.dictionary, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(blocked.coefficients, whole.coefficients, rtol=1e-4, atol=1e-5)
    assert blocked.objective == pytest.approx(whole.objective, rel=1e-5)
