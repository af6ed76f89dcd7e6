import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spadi_ao.solvers.whitening import shrink_gram, whiten


def _data(tokens: int, features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1, features, dtype=torch.float64)
    return torch.randn(tokens, features, generator=generator, dtype=torch.float64) * scales


@given(
    tokens=st.integers(2, 80),
    features=st.integers(2, 40),
    seed=st.integers(0, 1000),
    damping=st.sampled_from([0.0, 1e-2]),
)
@settings(max_examples=60, deadline=None)
def test_whitening_identity_including_rank_deficient(tokens, features, seed, damping):
    """||X E^T||_F == ||U E^T||_F for the (damped) Gram, also when tokens < features."""
    x = _data(tokens, features, seed)
    gram = x.T @ x
    result = whiten(gram, damping=damping)
    error = torch.randn(7, features, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    damped = gram + damping * torch.diagonal(gram).mean() * torch.eye(features, dtype=torch.float64)
    expected = torch.sqrt(torch.trace(error @ damped @ error.T).clamp_min(0))
    assert torch.allclose((result.factor @ error.T).norm(), expected, rtol=1e-6, atol=1e-9)
    if damping == 0.0:
        assert torch.allclose((x @ error.T).norm(), (result.factor @ error.T).norm(), rtol=1e-6, atol=1e-9)


def test_rank_deficient_gram_falls_back_to_eigh_and_inverse_is_finite():
    x = _data(5, 30, 0)
    result = whiten(x.T @ x, damping=0.0)
    assert result.method == "eigh"
    assert torch.isfinite(result.inverse).all()
    # On the data's span the inverse undoes the factor.
    projector = result.inverse @ result.factor
    assert torch.allclose(x @ projector.T, x, atol=1e-6)


def test_well_conditioned_gram_uses_cholesky():
    x = _data(200, 16, 1)
    result = whiten(x.T @ x)
    assert result.method == "cholesky"
    assert torch.allclose(result.inverse @ result.factor, torch.eye(16, dtype=torch.float64), atol=1e-8)


def test_zero_gram_never_fails():
    result = whiten(torch.zeros(6, 6, dtype=torch.float64))
    assert torch.isfinite(result.factor).all() and torch.isfinite(result.inverse).all()


def test_shrinkage_endpoints():
    x = _data(50, 8, 2)
    gram = x.T @ x
    assert torch.equal(shrink_gram(gram, 0.0), gram)
    assert torch.equal(shrink_gram(gram, 1.0), torch.diag(torch.diagonal(gram)))
