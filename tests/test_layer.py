"""The per-layer engine's reported error and back-mapped atoms, against dense math on small layers."""

import weakref

import pytest
import torch

import spadi_ao.layer as layer
import spadi_ao.solvers.ksvd
from spadi_ao.configs import DictionaryConfig, LowRankConfig
from spadi_ao.solvers.omp import codes_to_dense


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


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)])
def test_atoms_mapped_through_the_weight_equal_the_inverse_factor_on_the_span(shape):
    """``W^T X`` with ``A X = P D`` is ``U^-1 P D``; an atom outside ``A``'s span loses exactly that part."""
    weight, gram = _layer(*shape, seed=7 + sum(shape))
    whitening = layer.whitening_for(gram, shape[1], 1e-2, 0.0, weight.device)
    whitened = layer._whitened_weight(whitening, [weight]).double()
    generator = torch.Generator().manual_seed(5)
    dictionary = torch.randn(shape[1], 6, dtype=torch.float64, generator=generator)
    coordinates = layer.span_coordinates(whitened, dictionary)
    atoms = layer.atoms_in_input_space([weight], coordinates)
    basis = torch.linalg.svd(whitened, full_matrices=False)[0]  # an orthonormal basis of A's columns
    projected = basis @ (basis.T @ dictionary)
    assert torch.allclose(whitened @ coordinates, projected, atol=1e-5)
    reference = torch.linalg.solve(whitening.factor, projected)  # U^-1 P D, by an explicit solve
    assert torch.allclose(atoms.T, reference, rtol=1e-4, atol=1e-5 * reference.abs().max())
    if shape[0] < shape[1]:  # a tall A: its span is not everything, so something was dropped
        assert (dictionary - projected).norm() > 0.1 * dictionary.norm()
    zero = layer.span_coordinates(torch.zeros(8, 4), torch.randn(8, 2, generator=generator))
    assert torch.equal(zero, torch.zeros(4, 2, dtype=torch.float64))  # no span: every atom dropped, no failure


def test_grouped_atoms_sum_each_members_weight():
    weights = [torch.randn(out, 12, generator=torch.Generator().manual_seed(out)) for out in (5, 9)]
    coordinates = torch.randn(14, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = coordinates.T @ torch.cat(weights).double()
    assert torch.allclose(layer.atoms_in_input_space(weights, coordinates), expected, atol=1e-12)


@pytest.mark.parametrize("shape, freed", [((16, 48), True), ((48, 16), False)])
def test_a_tall_weights_handed_over_gram_is_freed_before_the_solve(monkeypatch, shape, freed):
    """With ``overwrite_gram`` the Gram becomes the whitening factor. Where it outweighs the whitened weight
    (more inputs than outputs: a down_proj) nothing keeps it past the whitening; elsewhere it maps the atoms
    back. Both decode to the output-error fit the report states."""
    weight, gram = _layer(*shape, seed=11)
    reference = gram.clone()
    gram_ref = weakref.ref(gram)
    handed = [gram]
    del gram
    alive_during_solve = []

    def recording(solve):
        def wrapped(*args, **kwargs):
            alive_during_solve.append(gram_ref() is not None)
            return solve(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(layer, "solve_dictionary", recording(layer.solve_dictionary))
    config = DictionaryConfig(compression_ratio=0.3, gram_shrinkage=0.0)
    tensor, report = layer.compress_weight("layer", weight, handed.pop(), config, overwrite_gram=True)
    assert alive_during_solve == [not freed]
    assert report.whitened_error == pytest.approx(
        _output_error(weight, tensor.dequantize(), reference, config.damping), rel=1e-4
    )


@pytest.mark.parametrize("shape, freed", [((48, 16), True), ((16, 48), False)])
def test_the_whitened_weight_is_freed_before_a_back_map_through_the_factor(monkeypatch, shape, freed):
    """Where the factor maps the atoms back (a wide group, as gate/up) the members are scored first and the
    whitened weight is gone before the back-map; a tall one maps back through it. Both report the output error
    of what they store, under each member's Gram."""
    weights = [_layer(*shape, seed=seed)[0] for seed in (3, 4)]
    gram = _layer(*shape, seed=3)[1]
    whitened_refs, alive_at_back_map = [], []
    solve, back_map = layer.solve_dictionary, layer._back_map

    def recording_solve(whitened, *args, **kwargs):
        whitened_refs.append(weakref.ref(whitened))
        return solve(whitened, *args, **kwargs)

    def recording_back_map(*args, **kwargs):
        alive_at_back_map.append(whitened_refs[-1]() is not None)
        return back_map(*args, **kwargs)

    monkeypatch.setattr(layer, "solve_dictionary", recording_solve)
    monkeypatch.setattr(layer, "_back_map", recording_back_map)
    config = DictionaryConfig(compression_ratio=0.3, gram_shrinkage=0.0)
    results = layer.compress_group(["a", "b"], weights, [gram, gram], config)
    assert alive_at_back_map == [not freed]
    for weight, (tensor, report) in zip(weights, results):
        expected = _output_error(weight, tensor.dequantize(), gram, config.damping)
        assert report.whitened_error == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("solver", ["procrustes", "fast"])
def test_weighted_solve_fits_the_heavy_outputs_and_restores_the_weight(solver):
    """The weighted solve is the plain solve of the columns scaled by sqrt(w), with the codes unscaled; an
    output weighted far above the rest is fitted far better than without weights."""
    generator = torch.Generator().manual_seed(2)
    whitened = torch.randn(24, 40, generator=generator)
    weights = torch.ones(40, dtype=torch.float64)
    weights[:3] = 1e4
    config = DictionaryConfig(solver=solver)
    original = whitened.clone()
    weighted = layer.solve_dictionary(whitened, 6, 2, config, weights)
    assert torch.allclose(whitened, original, rtol=1e-6, atol=1e-6)
    scaled = layer.solve_dictionary(original * weights.sqrt().float(), 6, 2, config)
    assert torch.equal(weighted.indices, scaled.indices)
    assert torch.allclose(weighted.coefficients * weights.sqrt().float().unsqueeze(1), scaled.coefficients, rtol=1e-5)
    plain = layer.solve_dictionary(original.clone(), 6, 2, config)

    def column_errors(result):
        approximation = result.dictionary @ codes_to_dense(result.indices, result.coefficients, 6)
        return (original - approximation).norm(dim=0)

    assert column_errors(weighted)[:3].max() < 0.2 * column_errors(plain)[:3].min()
    assert column_errors(weighted)[3:].sum() > column_errors(plain)[3:].sum()  # the light ones pay for it
