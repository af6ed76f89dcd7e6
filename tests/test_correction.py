"""Error correction: the corrected weight against dense least squares, and the paired streams against hooks."""

import contextlib

import pytest
import torch
from models import tiny_llama, token_batches

from spadi_ao import DictionaryConfig, LowRankConfig
from spadi_ao.block_inputs import InputStore, capture_block_inputs, run_block
from spadi_ao.calibration import GramCollector
from spadi_ao.correction import ReferenceOutputs, input_stages, run_paired
from spadi_ao.layer import compress_weight, whiten_group


def _streams(tokens=400, width=24, outs=10, seed=0):
    """Dense-stream inputs, compressed-stream inputs near them (with correlated inputs, as activations have),
    and a weight."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64)
    dense = torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ mixing
    compressed = dense + 0.3 * torch.randn(tokens, width, generator=generator, dtype=torch.float64) @ mixing
    weight = torch.randn(outs, width, generator=generator, dtype=torch.float64)
    return dense, compressed, weight


def _statistics(dense, compressed, weight):
    tokens = compressed.shape[0]
    return compressed.T @ compressed / tokens, (dense @ weight.T).T @ compressed / tokens


def _corrected(dense, compressed, weight, shrinkage, damping):
    """The reference: ``W_c`` minimises (1 - a) ||X_c A^T - Y||^2 / n + ||(A - W) diag(r)^1/2||^2, solved as one
    stacked least-squares system."""
    tokens = compressed.shape[0]
    gram = compressed.T @ compressed / tokens
    ridge = (shrinkage * gram.diagonal() + damping * gram.diagonal().mean()).sqrt()
    system = torch.cat([((1 - shrinkage) / tokens) ** 0.5 * compressed, torch.diag(ridge)])
    rhs = torch.cat([((1 - shrinkage) / tokens) ** 0.5 * dense @ weight.T, ridge.unsqueeze(1) * weight.T])
    return torch.linalg.lstsq(system, rhs, driver="gelsd").solution.T


@pytest.mark.parametrize("shrinkage, damping", [(0.0, 1e-6), (0.3, 1e-2), (1.0, 1e-2)])
def test_the_whitened_target_is_the_least_squares_fit_to_the_dense_outputs_whitened(shrinkage, damping):
    dense, compressed, weight = _streams(outs=30)
    gram, cross = _statistics(dense, compressed, weight)
    config = DictionaryConfig(gram_shrinkage=shrinkage, damping=damping)
    members = [weight[:12].float(), weight[12:].float()]  # two members reading one input share one Gram
    crosses = [cross[:12].float(), cross[12:].float()]
    whitening, whitened, _ = whiten_group(members, [gram, gram], config, [shrinkage] * 2, crosses=crosses)
    expected = whitening.apply(_corrected(dense, compressed, weight, shrinkage, damping).T)
    torch.testing.assert_close(whitened.double(), expected, rtol=2e-5, atol=1e-5 * float(expected.abs().max()))


def test_the_whitened_target_is_the_plain_one_when_the_streams_agree():
    dense, _, weight = _streams()
    gram, cross = _statistics(dense, dense, weight)
    config = DictionaryConfig(gram_shrinkage=0.3)
    plain = whiten_group([weight.float()], [gram], config, [0.3])[1]
    corrected = whiten_group([weight.float()], [gram], config, [0.3], crosses=[cross.float()])[1]
    torch.testing.assert_close(corrected, plain, rtol=1e-4, atol=1e-4 * float(plain.abs().max()))


def test_members_with_their_own_grams_cannot_be_corrected_together():
    dense, compressed, weight = _streams()
    gram, cross = _statistics(dense, compressed, weight)
    with pytest.raises(ValueError, match="one Gram shared by every member"):
        whiten_group([weight, weight], [gram, gram.clone()], DictionaryConfig(), crosses=[cross, cross])


def test_dead_inputs_without_damping_get_the_fit_on_the_datas_span():
    dense, compressed, weight = _streams()
    compressed[:, 3] = 0.0  # an input the compressed stream never drives: its Gram is singular
    gram, cross = _statistics(dense, compressed, weight)
    config = DictionaryConfig(gram_shrinkage=0.0, damping=0.0)
    whitening, whitened, _ = whiten_group([weight], [gram], config, [0.0], crosses=[cross])
    assert whitening.method == "eigh" and torch.isfinite(whitened).all()
    corrected = whitening.apply_inverse(whitened).T
    best = _corrected(dense, compressed, weight, 0.0, 0.0)
    fit = (compressed @ corrected.T - dense @ weight.T).norm()
    torch.testing.assert_close(fit, (compressed @ best.T - dense @ weight.T).norm(), rtol=1e-6, atol=1e-6)


def test_a_corrected_low_rank_solve_is_the_best_rank_r_fit_to_the_dense_outputs():
    """SVD-LLM's truncation is the optimal rank-r fit of what it is given: fitted to the dense outputs it reaches
    the reduced-rank regression optimum (computed independently, by QR and SVD); fitted to the weight it does
    not."""
    dense, compressed, weight = _streams(outs=24)
    gram, cross = _statistics(dense, compressed, weight)
    config = LowRankConfig(compression_ratio=0.5, gram_shrinkage=0.0, damping=1e-9)
    target = dense @ weight.T

    def output_error(cross=None):
        tensor, report = compress_weight(
            "layer", weight.float(), gram.clone(), config, compressed.shape[0], 0.0, cross=cross
        )
        return float((compressed @ tensor.dequantize().double().T - target).norm()), report.rank

    plain, rank = output_error()
    corrected, _ = output_error(cross.float())
    q, _ = torch.linalg.qr(compressed)
    projected = q.T @ target
    tail = torch.linalg.svdvals(projected)[rank:]
    optimum = float((tail.pow(2).sum() + (target - q @ projected).pow(2).sum()).sqrt())
    assert corrected == pytest.approx(optimum, rel=1e-4)
    assert plain > 1.01 * optimum


@pytest.mark.parametrize("outs", [8, 40], ids=["wide", "tall"])
def test_a_corrected_dictionary_reports_and_stores_its_fit_to_the_corrected_weight(outs):
    """Wide (atoms mapped back through the corrected weight) and tall (through the factor): the stored tensor's
    error against the corrected weight, measured independently, is the one reported."""
    dense, compressed, weight = _streams(outs=outs)
    gram, cross = _statistics(dense, compressed, weight)
    config = DictionaryConfig(compression_ratio=0.3, gram_shrinkage=0.3, allocation="uniform", grouping=None)
    tensor, report = compress_weight("layer", weight.float(), gram.clone(), config, 400, 0.3, cross=cross.float())
    corrected = _corrected(dense, compressed, weight, 0.3, config.damping)
    regularised = 0.7 * gram + torch.diag(0.3 * gram.diagonal() + config.damping * gram.diagonal().mean())
    factor = torch.linalg.cholesky(regularised).T
    error = factor @ (corrected - tensor.dequantize().double()).T
    assert report.whitened_error == pytest.approx(float(error.norm() / (factor @ corrected.T).norm()), rel=1e-3)
    assert report.whitened_error < 0.9


def test_paired_run_gathers_the_compressed_stream_and_pairs_it_with_the_dense_outputs():
    model = tiny_llama()
    block = model.model.layers[0]
    batches = token_batches(2, 8)
    store = InputStore()
    dense_inputs = capture_block_inputs(model, block, batches, store)
    compressed_inputs = [
        ((args[0] + 0.1 * torch.randn_like(args[0]),) + args[1:], kwargs) for args, kwargs in dense_inputs
    ]
    targets = {"q": block.self_attn.q_proj, "down": block.mlp.down_proj}

    def captured(inputs, hook_kind):
        seen = {name: [] for name in targets}
        handles = [
            module.register_forward_hook(lambda m, a, out, name=name: seen[name].append((a[0], out)))
            for name, module in targets.items()
        ]
        run_block(block, inputs, torch.device("cpu"), None)
        for handle in handles:
            handle.remove()
        return {name: [pair[hook_kind] for pair in pairs] for name, pairs in seen.items()}

    dense_outputs = captured(dense_inputs, 1)
    compressed_in = captured(compressed_inputs, 0)
    with GramCollector(targets) as collector:
        reference = ReferenceOutputs(targets)
        kept = run_paired(
            block,
            contextlib.nullcontext,
            compressed_inputs,
            dense_inputs,
            torch.device("cpu"),
            store,
            collector,
            reference,
        )
    expected_next = run_block(block, dense_inputs, torch.device("cpu"), InputStore())
    for (args, _), (expected, _) in zip(kept, expected_next):
        assert torch.equal(args[0], expected[0])  # the dense stream's outputs go on
    for name in targets:
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x in compressed_in[name]]).double()
        y = torch.cat([y.reshape(-1, y.shape[-1]) for y in dense_outputs[name]]).double()
        torch.testing.assert_close(collector.gram(name), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reference.take(name).double(), y.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
    assert reference.memory_bytes == 0


def test_a_llama_blocks_units_are_staged_in_the_order_it_reads_their_inputs():
    model = tiny_llama()
    block = model.model.layers[1]
    modules = {name: module for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
    sample = capture_block_inputs(model, block, token_batches(1, 8), InputStore())[0]
    singles = {name: [name] for name in modules}
    stages = input_stages(block, singles, modules, sample, torch.device("cpu"))
    assert [sorted(stage) for stage in stages] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    # a unit spanning stages waits for its latest member
    mixed = {
        "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "odd": ["self_attn.o_proj", "mlp.up_proj"],
    }
    assert input_stages(block, mixed, modules, sample, torch.device("cpu")) == [
        {"qkv": mixed["qkv"]},
        {"odd": mixed["odd"]},
    ]
