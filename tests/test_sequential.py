import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import accelerate
import pytest
import torch
from models import reference_gram, tiny_llama, token_batches
from torch import nn

import spadi_ao.api
import spadi_ao.block_inputs
import spadi_ao.checkpoint
import spadi_ao.distributed
import spadi_ao.report
import spadi_ao.sequential
from spadi_ao import DictionaryConfig, LowRankConfig, sparsify_dictionary_
from spadi_ao.api import select_linears
from spadi_ao.calibration import GramCollector
from spadi_ao.checkpoint import CheckpointMismatchError

CONFIG = DictionaryConfig(compression_ratio=0.3, iterations=1, atoms_per_step=4, allocation="uniform", grouping=None)
GLOBAL = dataclasses.replace(CONFIG, allocation="knapsack", grouping="inputs")


def _compressed_state(model):
    return {
        name: {inner: getattr(module.weight, inner).clone() for inner in module.weight.__tensor_flatten__()[0]}
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and type(module.weight).__name__ in ("DictionaryTensor", "LowRankTensor")
    }


def _assert_identical(a, b):
    assert a.keys() == b.keys() and a
    for name in a:
        for inner in a[name]:
            assert torch.equal(a[name][inner], b[name][inner]), (name, inner)


@pytest.mark.parametrize("config", [CONFIG, LowRankConfig(compression_ratio=0.3)])
def test_sequential_with_dense_propagation_equals_one_shot(config):
    batches = token_batches(3, 16)
    one_shot = tiny_llama()
    sparsify_dictionary_(one_shot, config, calibration=batches, progress=False)
    sequential = tiny_llama()
    report = sparsify_dictionary_(
        sequential, config, calibration=batches, sequential=True, propagate="dense", progress=False
    )
    assert len(report.layers) == 14 and report.calibration_tokens == 48
    a, b = _compressed_state(one_shot), _compressed_state(sequential)
    assert a.keys() == b.keys()
    for name in a:
        for inner in a[name]:
            assert torch.allclose(a[name][inner].float(), b[name][inner].float(), atol=1e-5), (name, inner)


def test_a_given_sensitivity_weighs_the_uniform_solves_alike_in_both_modes():
    batches = token_batches(3, 16)
    targets = select_linears(tiny_llama())
    generator = torch.Generator().manual_seed(0)
    sensitivity = {name: torch.rand(module.out_features, generator=generator) for name, module in targets.items()}
    states = []
    for sequential in (False, True):
        model = tiny_llama()
        sparsify_dictionary_(
            model, CONFIG, calibration=batches, sequential=sequential, propagate="dense", sensitivity=sensitivity,
            progress=False,
        )  # fmt: skip
        states.append(_compressed_state(model))
    unweighted = tiny_llama()
    sparsify_dictionary_(unweighted, CONFIG, calibration=batches, progress=False)
    for name in states[0]:
        for inner in states[0][name]:
            assert torch.allclose(states[0][name][inner].float(), states[1][name][inner].float(), atol=1e-5)
    assert any(
        not torch.allclose(states[0][name]["values"].float(), state["values"].float(), atol=1e-3)
        for name, state in _compressed_state(unweighted).items()
    )


@pytest.mark.parametrize("grouping", [None, "inputs"])
def test_knapsack_with_dense_propagation_equals_one_shot_bit_for_bit(grouping):
    """The first pass (blockwise sensitivity, per-unit tables) and the compress pass reproduce the whole-model run."""
    config = dataclasses.replace(GLOBAL, grouping=grouping)
    batches = token_batches(3, 16)
    one_shot = tiny_llama()
    expected = sparsify_dictionary_(one_shot, config, calibration=batches, progress=False)
    sequential = tiny_llama()
    report = sparsify_dictionary_(
        sequential, config, calibration=batches, sequential=True, propagate="dense", progress=False
    )
    assert len({layer.k for layer in expected.layers}) > 3  # the knapsack gave the layers different sizes
    assert [(layer.name, layer.k, layer.s, layer.group, layer.stored_bytes) for layer in report.layers] == [
        (layer.name, layer.k, layer.s, layer.group, layer.stored_bytes) for layer in expected.layers
    ]
    _assert_identical(_compressed_state(one_shot), _compressed_state(sequential))
    attention = sequential.model.layers[1].self_attn
    shared = (
        attention.q_proj.weight.dictionary is attention.k_proj.weight.dictionary is attention.v_proj.weight.dictionary
    )
    assert shared == (grouping == "inputs")
    assert (
        spadi_ao.report.compression_stats(sequential)["model_stored_bytes"]
        == spadi_ao.report.compression_stats(one_shot)["model_stored_bytes"]
    )


def test_blockwise_sensitivity_equals_the_plain_backward():
    """Blocks recomputed in the backward give the very same gradients, counted once."""
    from spadi_ao.allocation import output_sensitivity

    model = tiny_llama(layers=3)
    batches = token_batches(2, 16)
    targets = spadi_ao.api.select_linears(model)
    plain = output_sensitivity(model, targets, batches)
    blockwise = spadi_ao.sequential.blockwise_sensitivity(model, model.model.layers, targets, batches)
    assert plain.keys() == blockwise.keys() == targets.keys()
    assert all(torch.equal(plain[name], blockwise[name]) for name in plain)
    assert "forward" not in model.model.layers[0].__dict__  # the blocks' own forward is back


def test_cross_block_groups_are_refused_before_any_weight_changes():
    model = tiny_llama()
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="across decoder blocks.*grouping='inputs'.*sequential=False"):
        sparsify_dictionary_(
            model,
            dataclasses.replace(GLOBAL, grouping="paper"),
            calibration=token_batches(2, 16),
            sequential=True,
            progress=False,
        )
    assert all(torch.equal(p, dense[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("crash_in", ["survey", "compress"])
def test_knapsack_resume_reuses_the_first_pass_and_is_bit_identical(tmp_path, monkeypatch, crash_in):
    batches = token_batches(3, 16)
    model = tiny_llama(layers=3)
    reference = sparsify_dictionary_(model, GLOBAL, calibration=batches, sequential=True, progress=False)
    expected = _compressed_state(model)

    class Killed(Exception):
        pass

    name = "save_tables" if crash_in == "survey" else "save"
    original = getattr(spadi_ao.checkpoint.Checkpoint, name)
    calls = []

    def crash_on_second(self, *args):
        original(self, *args)
        calls.append(args)
        if len(calls) == 2:
            raise Killed

    monkeypatch.setattr(spadi_ao.checkpoint.Checkpoint, name, crash_on_second)
    with pytest.raises(Killed):
        sparsify_dictionary_(
            tiny_llama(layers=3), GLOBAL, calibration=batches, sequential=True, checkpoint_dir=tmp_path, progress=False
        )
    monkeypatch.setattr(spadi_ao.checkpoint.Checkpoint, name, original)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sensitivity"] and len(manifest["tables"]) == (
        8 if crash_in == "survey" else 12
    )  # 4 units a block: qkv, o, gate_up, down

    recomputed = []
    monkeypatch.setattr(spadi_ao.sequential, "blockwise_sensitivity", lambda *a: recomputed.append(a) or {})
    surveyed = []
    original_tabulate = spadi_ao.api.tabulate_unit
    monkeypatch.setattr(
        spadi_ao.api,
        "tabulate_unit",
        lambda config, unit, *a, **k: surveyed.append(unit) or original_tabulate(config, unit, *a, **k),
    )
    resumed = tiny_llama(layers=3)
    report = sparsify_dictionary_(
        resumed, GLOBAL, calibration=batches, sequential=True, checkpoint_dir=tmp_path, progress=False
    )
    assert not recomputed and len(surveyed) == (4 if crash_in == "survey" else 0)
    _assert_identical(expected, _compressed_state(resumed))
    assert [layer.k for layer in report.layers] == [layer.k for layer in reference.layers]
    attention = resumed.model.layers[0].self_attn  # read back from the checkpoint, one dictionary again
    assert attention.q_proj.weight.dictionary is attention.v_proj.weight.dictionary


def test_compressed_propagation_changes_later_blocks_only():
    batches = token_batches(3, 16)
    dense = tiny_llama()
    sparsify_dictionary_(dense, CONFIG, calibration=batches, sequential=True, propagate="dense", progress=False)
    compressed = tiny_llama()
    sparsify_dictionary_(
        compressed, CONFIG, calibration=batches, sequential=True, propagate="compressed", progress=False
    )
    a, b = _compressed_state(dense), _compressed_state(compressed)
    first = [n for n in a if ".layers.0." in n]
    later = [n for n in a if ".layers.1." in n]
    assert all(torch.equal(a[n]["values"], b[n]["values"]) for n in first)
    assert any(not torch.equal(a[n]["values"], b[n]["values"]) for n in later)


def test_corrected_propagation_solves_the_first_stage_as_compressed_does_and_corrects_the_rest():
    """Before the first block's first stage (q/k/v) both streams are the captured inputs, so its corrected weights
    are its dense ones (to rounding) and its solves match compressed propagation's; every later Linear reads
    inputs that earlier compressed stages changed and is fitted to other targets."""
    config = LowRankConfig(compression_ratio=0.3)  # a deterministic solve: rounding cannot flip a support
    batches = token_batches(3, 16)
    compressed, corrected = tiny_llama(), tiny_llama()
    for model, propagate in ((compressed, "compressed"), (corrected, "corrected")):
        sparsify_dictionary_(model, config, calibration=batches, sequential=True, propagate=propagate, progress=False)
    first_stage = [f"model.layers.0.self_attn.{name}_proj" for name in "qkv"]
    for name, module in compressed.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            a, b = module.weight.dequantize(), corrected.get_submodule(name).weight.dequantize()
            if name in first_stage:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            else:
                assert (a - b).norm() > 1e-3 * a.norm(), name


def test_corrected_propagation_runs_the_dense_stream_with_the_dense_weights_of_every_stage(monkeypatch):
    """Later stages run the dense stream while earlier stages' compressed weights are installed: the dense ones are
    swapped back for each of its forwards, and the compressed ones return after."""
    seen = []
    original = spadi_ao.sequential.run_paired

    def spy(block, dense_weights, *args, **kwargs):
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]

        @contextlib.contextmanager
        def checked():
            before = [m.weight for m in linears]
            with dense_weights():
                seen.append(
                    (
                        any(type(w).__name__ == "DictionaryTensor" for w in before),
                        all(type(m.weight) is nn.Parameter for m in linears),
                    )
                )
                yield
            assert all(m.weight is w for m, w in zip(linears, before))

        return original(block, checked, *args, **kwargs)

    monkeypatch.setattr(spadi_ao.sequential, "run_paired", spy)
    sparsify_dictionary_(
        tiny_llama(), CONFIG, calibration=token_batches(2, 16), sequential=True, propagate="corrected", progress=False
    )
    assert all(dense for _, dense in seen)
    assert any(compressed_before for compressed_before, _ in seen)


def test_blended_propagation_whitens_with_the_dense_and_compressed_streams_pooled(monkeypatch):
    """A block-1 Linear is solved with ``(X_d^T X_d + X_c^T X_c) / (n_d + n_c)``: ``X_d`` from the dense model,
    ``X_c`` from a model whose block 0 holds the blended run's compressed weights, both by plain hooks."""
    batches = token_batches(3, 16)
    name = "model.layers.1.mlp.down_proj"
    seen = {}
    original = spadi_ao.api.compress_weight

    def spy(layer, weight, gram, *args, **kwargs):
        if layer == name:
            seen["gram"] = gram.clone()
        return original(layer, weight, gram, *args, **kwargs)

    monkeypatch.setattr(spadi_ao.api, "compress_weight", spy)
    blended = tiny_llama()
    sparsify_dictionary_(blended, CONFIG, calibration=batches, sequential=True, propagate="blended", progress=False)

    dense, dense_tokens = reference_gram(tiny_llama(), name, batches)
    stream = tiny_llama()
    stream.model.layers[0] = blended.model.layers[0]  # compressed block 0, dense block 1
    compressed, compressed_tokens = reference_gram(stream, name, batches)
    expected = (dense * dense_tokens + compressed * compressed_tokens) / (dense_tokens + compressed_tokens)
    torch.testing.assert_close(seen["gram"], expected, rtol=1e-5, atol=1e-6 * expected.diagonal().mean().item())
    # the streams differ, so the pooled Gram is neither one alone
    assert not torch.allclose(dense, expected, rtol=1e-3)
    assert not torch.allclose(compressed, expected, rtol=1e-3)


def test_the_first_pass_is_the_same_whatever_the_propagation(monkeypatch):
    """The knapsack's tables come from dense propagation: a second stream must not reach them."""
    tables = {}
    original = spadi_ao.sequential._Blockwise.survey

    def spy(self, *args, **kwargs):
        tables[self.propagate] = original(self, *args, **kwargs)
        return tables[self.propagate]

    monkeypatch.setattr(spadi_ao.sequential._Blockwise, "survey", spy)
    for propagate in ("dense", "compressed", "corrected", "blended"):
        sparsify_dictionary_(
            tiny_llama(), GLOBAL, calibration=token_batches(3, 16), sequential=True, propagate=propagate, progress=False
        )
    assert tables["dense"] == tables["compressed"] == tables["corrected"] == tables["blended"]


@pytest.mark.parametrize("propagate", ["compressed", "corrected", "blended"])
def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch, propagate):
    batches = token_batches(3, 16)
    reference = tiny_llama()
    sparsify_dictionary_(reference, CONFIG, calibration=batches, sequential=True, propagate=propagate, progress=False)

    crashed = tiny_llama()
    original_save = spadi_ao.checkpoint.Checkpoint.save
    saved = []

    def crash_after_nine(self, name, weight, report):
        original_save(self, name, weight, report)
        saved.append(name)
        if len(saved) == 9:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(spadi_ao.checkpoint.Checkpoint, "save", crash_after_nine)
    dense_block_1 = {n: p.clone() for n, p in crashed.model.layers[1].named_parameters()}
    with pytest.raises(KeyboardInterrupt) as failure:
        sparsify_dictionary_(
            crashed,
            CONFIG,
            calibration=batches,
            sequential=True,
            propagate=propagate,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    # Block 0 finished and keeps its compressed weights (dense ones were released); block 1 was in flight and is
    # restored.
    assert sorted({name.split(".")[2] for name in _compressed_state(crashed)}) == ["0"]
    assert all(torch.equal(p, dense_block_1[n]) for n, p in crashed.model.layers[1].named_parameters())
    assert "blocks 0-0 of 2 were compressed" in "".join(getattr(failure.value, "__notes__", []))
    with torch.no_grad():
        assert torch.isfinite(crashed(batches[0]).logits).all()  # a working, partly compressed model
    monkeypatch.setattr(spadi_ao.checkpoint.Checkpoint, "save", original_save)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["layers"]) == 9

    resumed = tiny_llama()
    solved = []
    original_solve = spadi_ao.api.compress_weight
    monkeypatch.setattr(
        spadi_ao.api, "compress_weight", lambda name, *a, **k: solved.append(name) or original_solve(name, *a, **k)
    )
    sparsify_dictionary_(
        resumed,
        CONFIG,
        calibration=batches,
        sequential=True,
        propagate=propagate,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    assert len(solved) == 14 - 9
    _assert_identical(_compressed_state(reference), _compressed_state(resumed))


def test_mismatched_or_corrupted_checkpoint_is_refused_and_touches_nothing(tmp_path):
    batches = token_batches(2, 16)
    sparsify_dictionary_(
        tiny_llama(), CONFIG, calibration=batches, sequential=True, checkpoint_dir=tmp_path, progress=False
    )
    model = tiny_llama()
    with pytest.raises(CheckpointMismatchError, match="different arguments"):
        sparsify_dictionary_(
            model,
            DictionaryConfig(
                compression_ratio=0.4, iterations=1, atoms_per_step=4, allocation="uniform", grouping=None
            ),
            calibration=batches,
            sequential=True,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert not _compressed_state(model)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointMismatchError, match="corrupted"):
        sparsify_dictionary_(
            model, CONFIG, calibration=batches, sequential=True, checkpoint_dir=tmp_path, progress=False
        )
    assert not _compressed_state(model)


@pytest.mark.parametrize(
    "variant",
    [
        "float",
        "torchao-int8-dictionary",
        "knapsack-inputs-groups",
        "knapsack-inputs-groups-corrected",
        "knapsack-inputs-groups-blended",
    ],
)
def test_two_gloo_processes_equal_one(tmp_path, variant):
    """The exchange carries every inner tensor, torchao's nested Int8Tensor and int8 values included; with the
    knapsack the ranks share the first pass's tables, and groups keep one dictionary."""
    extra = {
        "float": "allocation='uniform', grouping=None",
        "torchao-int8-dictionary": (
            "allocation='uniform', grouping=None, "
            "dictionary_quantization=Int8DynamicActivationInt8WeightConfig(), values_dtype='int8'"
        ),
        "knapsack-inputs-groups": "allocation='knapsack', grouping='inputs'",
        "knapsack-inputs-groups-corrected": "allocation='knapsack', grouping='inputs'",
        "knapsack-inputs-groups-blended": "allocation='knapsack', grouping='inputs'",
    }[variant]
    propagate = next((p for p in ("corrected", "blended") if variant.endswith(f"-{p}")), "compressed")
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, torch, torch.distributed as dist
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from models import tiny_llama, token_batches
        from spadi_ao import DictionaryConfig, sparsify_dictionary_
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        torch.set_num_threads(1)
        if os.environ.get("WORLD_SIZE"):
            dist.init_process_group("gloo")
        model = tiny_llama()
        sparsify_dictionary_(model, DictionaryConfig(compression_ratio=0.3, iterations=1, atoms_per_step=4, {extra}),
                             calibration=token_batches(3, 16), sequential=True, propagate={propagate!r},
                             progress=False)
        rank = dist.get_rank() if dist.is_initialized() else "single"
        state = {{n: m.weight.dequantize() for n, m in model.named_modules()
                  if type(getattr(m, "weight", None)).__name__ == "DictionaryTensor"}}
        attention = model.model.layers[1].self_attn
        state["shared"] = torch.tensor(attention.q_proj.weight.dictionary is attention.k_proj.weight.dictionary)
        torch.save(state, {str(tmp_path)!r} + f"/state_{{rank}}.pt")
        if dist.is_initialized():
            dist.destroy_process_group()
    """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, str(script)], check=True, env=env)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517", str(script)],
        check=True,
        env=env,
        capture_output=True,
    )
    single = torch.load(tmp_path / "state_single.pt")
    for rank in (0, 1):
        distributed = torch.load(tmp_path / f"state_{rank}.pt")
        assert single.keys() == distributed.keys() and len(single) == 15
        assert all(torch.equal(single[name], distributed[name]) for name in single)
        assert bool(distributed["shared"]) == variant.startswith("knapsack-inputs-groups")


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("seed", range(5))
def test_solves_are_dealt_within_the_greedy_bound_of_the_best_split(world, seed):
    """Longest-first greedy is within 4/3 of the best makespan; the best comes from trying every split."""
    import itertools

    costs = torch.rand(6, generator=torch.Generator().manual_seed(seed)).add(0.1).tolist()
    owners = spadi_ao.distributed.deal_solves(costs, world)
    assert owners == spadi_ao.distributed.deal_solves(costs, world)  # every rank computes the same deal
    makespan = max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(world))
    best = min(
        max(sum(c for c, o in zip(costs, split) if o == r) for r in range(world))
        for split in itertools.product(range(world), repeat=len(costs))
    )
    assert best <= makespan <= best * 4 / 3 + 1e-12


def test_a_llama_blocks_mlp_solves_are_not_dealt_two_to_one_rank():
    shapes = {
        "q": (2048, 2048),
        "k": (512, 2048),
        "v": (512, 2048),
        "o": (2048, 2048),
        "gate": (8192, 2048),
        "up": (8192, 2048),
        "down": (2048, 8192),
    }
    linears = [nn.Linear(i, o, bias=False, device="meta") for o, i in shapes.values()]
    owners = dict(zip(shapes, spadi_ao.distributed.deal_solves(spadi_ao.distributed.solve_costs(linears, {}), 2)))
    assert owners["gate"] == owners["up"] != owners["down"]
    # Once a block has been timed its seconds replace the FLOP model, e.g. where float64 is fast.
    measured = {(o, i): seconds for (o, i), seconds in zip(shapes.values(), [4, 0.5, 0.5, 4, 12, 12, 16])}
    owners = dict(zip(shapes, spadi_ao.distributed.deal_solves(spadi_ao.distributed.solve_costs(linears, measured), 2)))
    assert owners["gate"] == owners["up"] != owners["down"] == owners["q"] == owners["o"]


def test_selection_outside_the_blocks_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="only Linears inside"):
        sparsify_dictionary_(
            model, CONFIG, filter_fn=lambda m, n: True, calibration=token_batches(1, 8), sequential=True, progress=False
        )


@pytest.mark.parametrize("propagate", ["compressed", "corrected", "blended"])
def test_failure_keeps_finished_blocks_compressed_and_restores_the_block_in_flight(monkeypatch, propagate):
    """With correction the block in flight already holds its attention stages' compressed weights when its MLP fails."""
    batches = token_batches(2, 16)
    model = tiny_llama(layers=3)
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    finished_block = [weakref.ref(m.weight) for m in model.model.layers[0].modules() if isinstance(m, nn.Linear)]
    released_in_flight = []
    original_solve = spadi_ao.api.compress_weight

    def fail_in_block_two(name, *args, **kwargs):
        if name.startswith("model.layers.2.mlp"):
            gc.collect()
            released_in_flight.append(all(ref() is None for ref in finished_block))
            raise RuntimeError("solver blew up")
        return original_solve(name, *args, **kwargs)

    monkeypatch.setattr(spadi_ao.api, "compress_weight", fail_in_block_two)
    with pytest.raises(RuntimeError, match="solver blew up") as failure:
        sparsify_dictionary_(model, CONFIG, calibration=batches, sequential=True, propagate=propagate, progress=False)
    assert released_in_flight == [True]  # block 0's dense weights were gone while block 2 was solved
    assert "blocks 0-1 of 3 were compressed" in "".join(getattr(failure.value, "__notes__", []))
    assert sorted({name.split(".")[2] for name in _compressed_state(model)}) == ["0", "1"]
    assert all(torch.equal(p, dense[f"model.layers.2.{n}"]) for n, p in model.model.layers[2].named_parameters())
    with torch.no_grad():
        assert torch.isfinite(model(batches[0]).logits).all()


def test_compute_device_argument_gives_identical_results():
    batches = token_batches(3, 16)
    reference, moved = tiny_llama(), tiny_llama()
    sparsify_dictionary_(reference, CONFIG, calibration=batches, sequential=True, progress=False)
    sparsify_dictionary_(moved, CONFIG, calibration=batches, sequential=True, device="cpu", progress=False)
    _assert_identical(_compressed_state(reference), _compressed_state(moved))
    assert all(p.device.type == "cpu" for p in moved.parameters())
    with pytest.raises(ValueError, match="needs sequential=True"):
        sparsify_dictionary_(tiny_llama(), CONFIG, calibration=batches, device="cpu", progress=False)


def _offload(model, how, directory):
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device="cpu")
    elif how == "disk_offload":
        accelerate.disk_offload(model, str(directory), execution_device="cpu")
    else:  # block 1 on disk, the rest in place
        device_map = {
            name: "cpu"
            for name in ("model.embed_tokens", "model.layers.0", "model.norm", "model.rotary_emb", "lm_head")
        }
        accelerate.dispatch_model(model, {**device_map, "model.layers.1": "disk"}, offload_dir=str(directory))
    return model


@pytest.mark.parametrize("config", [CONFIG, GLOBAL], ids=["uniform", "knapsack-inputs-groups"])
@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "device_map"])
def test_accelerate_offloaded_model_compresses_like_a_loaded_one(how, config, tmp_path):
    """With the knapsack, the sensitivity backward also runs through accelerate's hooks (weights on meta)."""
    batches = token_batches(3, 16)
    reference = tiny_llama()
    sparsify_dictionary_(reference, config, calibration=batches, sequential=True, progress=False)
    model = _offload(tiny_llama(), how, tmp_path)
    assert model.model.layers[1].mlp.down_proj.weight.is_meta
    sparsify_dictionary_(model, config, calibration=batches, sequential=True, progress=False)
    _assert_identical(_compressed_state(reference), _compressed_state(model))
    down = model.model.layers[1].mlp.down_proj
    assert type(down.weight).__name__ == "DictionaryTensor" and down.weight.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(model(batches[0]).logits, reference(batches[0]).logits)
    if how == "cpu_offload":  # the dense values left accelerate's in-memory map as their blocks finished
        state = model.model.norm._hf_hook.weights_map.dataset
        assert "model.norm.weight" in state and not [key for key in state if key.endswith("_proj.weight")]


def test_blended_propagation_compresses_an_offloaded_model_like_a_loaded_one(tmp_path):
    """Unlike correction, blending never swaps weights: both streams run through accelerate's hooks."""
    batches = token_batches(3, 16)
    reference = tiny_llama()
    sparsify_dictionary_(reference, GLOBAL, calibration=batches, sequential=True, propagate="blended", progress=False)
    model = _offload(tiny_llama(), "disk_offload", tmp_path)
    sparsify_dictionary_(model, GLOBAL, calibration=batches, sequential=True, propagate="blended", progress=False)
    _assert_identical(_compressed_state(reference), _compressed_state(model))


def test_offloaded_model_is_refused_where_it_cannot_work(tmp_path):
    batches = token_batches(1, 8)
    model = _offload(tiny_llama(), "cpu_offload", tmp_path)
    with pytest.raises(ValueError, match="offloaded by accelerate.*sequential=True"):
        sparsify_dictionary_(model, CONFIG, calibration=batches, progress=False)
    with pytest.raises(ValueError, match="dispatched by accelerate.*device=None"):
        sparsify_dictionary_(model, CONFIG, calibration=batches, sequential=True, device="cpu", progress=False)
    with pytest.raises(ValueError, match="propagate='corrected'.*dispatched by accelerate"):
        sparsify_dictionary_(model, CONFIG, calibration=batches, sequential=True, propagate="corrected", progress=False)
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta  # untouched


def _first_block_collector(sequences: int) -> tuple[GramCollector, list[str]]:
    """A collector that has seen ``sequences`` x 16 tokens through the first block's Linears."""
    model = tiny_llama()
    linears = {name: m for name, m in model.model.layers[0].named_modules() if isinstance(m, nn.Linear)}
    with GramCollector(linears) as collector, torch.no_grad():
        for batch in token_batches(sequences, 16):
            model(batch)
    return collector, list(linears)


def test_collector_frees_each_gram_once_its_last_reader_is_done():
    collector, linears = _first_block_collector(2)
    expected = {name: collector.gram(name) for name in linears}
    total = collector.memory_bytes
    assert torch.equal(collector.take("self_attn.q_proj"), expected["self_attn.q_proj"])
    collector.release("self_attn.k_proj")
    assert collector.memory_bytes == total  # v still needs the Gram q/k/v share
    assert torch.equal(collector.take("self_attn.v_proj"), expected["self_attn.v_proj"])
    assert collector.memory_bytes == total - 64 * 64 * 8
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert torch.equal(collector.take(name), expected[name])
    assert collector.memory_bytes == 0 and collector.tokens("mlp.down_proj") == 32


def test_readers_of_one_input_share_one_gram_object_and_a_whole_group_takes_the_sum_itself():
    collector, _ = _first_block_collector(2)
    expected = collector.gram("self_attn.q_proj")
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    total = collector.memory_bytes
    read = collector.grams(qkv)
    assert read[0] is read[1] is read[2] and torch.equal(read[0], expected)
    partial = collector.grams(qkv[:2], take=True)  # v still reads it: a copy, the sum stays
    assert partial[0] is partial[1] and torch.equal(partial[0], expected) and collector.memory_bytes == total
    taken = collector.grams(qkv, take=True)
    assert taken[0] is taken[1] is taken[2] and torch.equal(taken[0], expected)
    assert collector.memory_bytes == total - 64 * 64 * 8  # handed over, not copied
    mlp = collector.grams(["mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"])
    assert mlp[0] is mlp[2] and mlp[1] is not mlp[0] and mlp[1].shape == (160, 160)


@pytest.mark.parametrize("allocation", ["uniform", "knapsack"])
def test_widest_gram_is_gathered_and_solved_beside_no_other(allocation, monkeypatch):
    """Each block runs twice: its down_proj's Gram (the widest) alone, then the others; every Gram is read
    from a collector holding only its own pass' Grams, and the result is the one-shot transform's."""
    seen = {}
    grams = GramCollector.grams

    def recording_grams(self, names, take=False):
        for name in names:
            seen.setdefault(name, (sorted(self.module_names), self.memory_bytes))
        return grams(self, names, take)

    monkeypatch.setattr(GramCollector, "grams", recording_grams)
    config = DictionaryConfig(compression_ratio=0.4, allocation=allocation)
    model = tiny_llama()
    sparsify_dictionary_(model, config, calibration=token_batches(4, 16), sequential=True, propagate="dense")
    for index in range(2):
        down = f"model.layers.{index}.mlp.down_proj"
        assert seen[down] == ([down], 160 * 160 * 8)  # its Gram only: intermediate 160 inputs, float64
        for name, (collected, _) in seen.items():
            if name.startswith(f"model.layers.{index}.") and name != down:
                assert down not in collected and name in collected
    reference = tiny_llama()
    sparsify_dictionary_(reference, config, calibration=token_batches(4, 16))
    _assert_identical(_compressed_state(reference), _compressed_state(model))


@pytest.mark.parametrize("propagate", ["dense", "compressed", "corrected", "blended"])
def test_block_inputs_that_do_not_fit_are_spilled_and_change_nothing(propagate, tmp_path, monkeypatch):
    """With (as if) no memory to spare every block input goes to a memory-mapped file: same bytes, no files left."""
    batches = token_batches(3, 16)
    in_memory = tiny_llama()
    sparsify_dictionary_(in_memory, CONFIG, calibration=batches, sequential=True, propagate=propagate, progress=False)
    stores = []
    original = spadi_ao.block_inputs.InputStore.__init__

    def record(self, directory=None):
        original(self, directory)
        stores.append(self)

    monkeypatch.setattr(spadi_ao.block_inputs, "available_memory_bytes", lambda: 0)
    monkeypatch.setattr(spadi_ao.block_inputs.InputStore, "__init__", record)
    spilled = tiny_llama()
    sparsify_dictionary_(
        spilled,
        CONFIG,
        calibration=batches,
        sequential=True,
        propagate=propagate,
        checkpoint_dir=tmp_path / "run",
        progress=False,
    )
    _assert_identical(_compressed_state(in_memory), _compressed_state(spilled))
    # the two blocks' inputs, three samples each (the last block's outputs are not kept), and with two streams the
    # second block's dense-stream inputs
    assert stores[0].spilled == 3 * (3 if propagate in ("corrected", "blended") else 2)
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("spadi-ao-inputs-")] == []
