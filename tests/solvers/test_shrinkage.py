import pytest
import torch
from torch import nn

from spadi_ao import DictionaryConfig, LowRankConfig, sparsify_dictionary_
from spadi_ao.calibration import GramCollector
from spadi_ao.layer import compress_weight
from spadi_ao.solvers.shrinkage import SequenceMoments, diagonal_shrinkage_intensity


def _gram(seed: int = 0, features: int = 12, tokens: int = 200) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=generator, dtype=torch.float64) @ torch.randn(
        features, features, generator=generator, dtype=torch.float64
    )
    return x.T @ x / tokens


def _weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(20, 12, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "config",
    [
        LowRankConfig(compression_ratio=0.4),
        DictionaryConfig(compression_ratio=0.4, iterations=2, gram_shrinkage="auto"),
    ],
)
def test_zero_shrinkage_is_the_unregularised_solution(config):
    gram = _gram()
    plain, _ = compress_weight("w", _weight(), gram, config)
    shrunk, report = compress_weight("w", _weight(), gram, config, shrinkage=0.0)
    assert report.gram_shrinkage == 0.0
    assert torch.equal(plain.dequantize(), shrunk.dequantize())


@pytest.mark.parametrize(
    "config", [LowRankConfig(compression_ratio=0.4), DictionaryConfig(compression_ratio=0.4, iterations=2)]
)
def test_full_shrinkage_is_the_solution_for_the_target_alone(config):
    gram = _gram()
    full, _ = compress_weight("w", _weight(), gram, config, shrinkage=1.0)
    target, _ = compress_weight("w", _weight(), torch.diag(torch.diagonal(gram)), config, shrinkage=0.0)
    assert torch.allclose(full.dequantize(), target.dequantize(), atol=1e-5)


def test_full_shrinkage_of_an_equal_variance_gram_is_weight_space_fitting():
    """Target = scaled identity: the low-rank solution is the truncated SVD of W itself."""
    gram = _gram()
    gram = gram / torch.diagonal(gram).sqrt().outer(torch.diagonal(gram).sqrt())  # unit diagonal
    weight = _weight()
    config = LowRankConfig(compression_ratio=0.4, damping=0.0)
    compressed, report = compress_weight("w", weight, gram, config, shrinkage=1.0)
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    rank = report.rank
    expected = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert torch.allclose(compressed.dequantize().double(), expected, atol=1e-5)


def test_auto_estimate_matches_an_independent_computation():
    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randn(30, 6, generator=generator, dtype=torch.float64) * (1 + i) for i in range(5)]
    grams = [x.T @ x / x.shape[0] for x in sequences]
    mean = sum(grams) / len(grams)
    moments = SequenceMoments()
    for g in grams:
        moments.add(g)
    off = ~torch.eye(6, dtype=torch.bool)
    variance_of_mean = torch.stack([g[off] for g in grams]).var(dim=0, unbiased=True).sum() / len(grams)
    expected = min(1.0, (variance_of_mean / mean[off].pow(2).sum()).item())
    assert diagonal_shrinkage_intensity(mean, moments) == pytest.approx(expected, rel=1e-9)


def test_auto_is_deterministic_uses_only_calibration_and_is_reported():
    generator = torch.Generator().manual_seed(4)
    calibration = [torch.randn(2, 16, 12, generator=generator) for _ in range(3)]  # 6 sequences
    results = []
    for _ in range(2):
        model = nn.Sequential(nn.Linear(12, 20, bias=False))
        model[0].weight.data.copy_(_weight())
        report = sparsify_dictionary_(
            model,
            DictionaryConfig(compression_ratio=0.4, iterations=1, gram_shrinkage="auto"),
            calibration=calibration,
            progress=False,
        )
        results.append((report.layers[0].gram_shrinkage, model[0].weight.dequantize()))
    assert results[0][0] == results[1][0] and 0.0 < results[0][0] <= 1.0
    assert torch.equal(results[0][1], results[1][1])
    with GramCollector({"0": model[0]}) as collector:
        with torch.no_grad():
            for batch in calibration:
                model(batch)
    assert collector.sequences("0") == 6
    assert collector.shrinkage("0") == pytest.approx(results[0][0])


def test_single_sequence_gives_no_shrinkage():
    moments = SequenceMoments()
    moments.add(_gram())
    assert diagonal_shrinkage_intensity(_gram(), moments) == 0.0
