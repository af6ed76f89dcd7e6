"""The per-layer engine's reported error and back-mapped atoms, against dense math on small layers."""

import pytest
import torch

import spadi_ao.layer as layer
import spadi_ao.solvers.ksvd
from spadi_ao.configs import DictionaryConfig, LowRankConfig


def _layer(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    inputs = torch.randn(4 * in_features, in_features, generator=generator) * torch.logspace(0, -1.5, in_features)
    return weight, inputs.double().T @ inputs.double()


def _output_error(weight: torch.Tensor, approximation: torch.Tensor, gram: torch.Tensor, damping: float) -> float:
    """``||U (W - W_hat)^T|| / ||U W^T||`` with ``U^T U`` the damped Gram, from its Cholesky factor."""
    damped = gram + damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    factor = torch.linalg.cholesky(damped).T
    exact = factor @ weight.double().T
    return float((exact - factor @ approximation.double().T).norm() / exact.norm())


@pytest.mark.parametrize(
    "config",
    [
        DictionaryConfig(compression_ratio=0.3, solver="fast", gram_shrinkage=0.0),
        LowRankConfig(compression_ratio=0.3, gram_shrinkage=0.0),
    ],
)
@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_reported_error_is_the_output_error_of_the_stored_weight(config, shape):
    weight, gram = _layer(*shape, seed=sum(shape))
    tensor, report = layer.compress_weight("layer", weight, gram.clone(), config)
    assert report.whitened_error == pytest.approx(
        _output_error(weight, tensor.dequantize(), gram, config.damping), rel=1e-4
    )


def test_blockwise_passes_change_nothing(monkeypatch):
    """Blocks of a few atoms and columns (what an 8192-wide layer gets) give the one-block result."""
    weight, gram = _layer(40, 24, seed=3)
    config = DictionaryConfig(compression_ratio=0.3, solver="fast", gram_shrinkage=0.0)
    whole, whole_report = layer.compress_weight("layer", weight, gram.clone(), config)
    monkeypatch.setattr(layer, "BLOCK_ELEMENTS", 24 * 3)
    monkeypatch.setattr(spadi_ao.solvers.ksvd, "BLOCK_ELEMENTS", 24 * 3)
    blocked, blocked_report = layer.compress_weight("layer", weight, gram.clone(), config)
    assert torch.allclose(blocked.dictionary, whole.dictionary, rtol=1e-6, atol=1e-7)
    assert torch.equal(blocked.bitmask, whole.bitmask)
    assert blocked_report.whitened_error == pytest.approx(whole_report.whitened_error, rel=1e-6)
