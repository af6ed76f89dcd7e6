import inspect
import json

import pytest
import torch

from spadi_ao import DictionaryConfig, sparsify_dictionary_
from spadi_ao.cli import main
from spadi_ao.sequential import PROPAGATIONS
from spadi_ao.serialization import load_compressed


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_llama, tiny_tokenizer):
    path = tmp_path / "tiny"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


FAST = ["--n-samples", "3", "--seq-len", "32", "--eval-windows", "2", "--batch-size", "2"]
PER_LAYER = ["--allocation", "uniform", "--grouping", "none"]  # what --sequential supports on this branch


@pytest.mark.parametrize("method", ["cospadi", "svd-llm"])
def test_compress_writes_model_and_report(tmp_path, tiny_model_dir, method, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "compress",
                "--model",
                str(tiny_model_dir),
                "--method",
                method,
                "--ratio",
                "0.4",
                "--output",
                str(out),
                *FAST,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "dense: perplexity" in printed and "compressed: perplexity" in printed
    report = json.loads((out / "spadi_report.json").read_text())
    assert set(report) >= {"model", "config", "dense_perplexity", "compressed_perplexity", "compression"}
    compression = report["compression"]
    assert compression["method"] == method and compression["compression_ratio"] >= 0.4
    assert compression["resident_bytes"] == compression["stored_bytes"]  # the weights hold no more than that
    assert f"{compression['resident_bytes'] / 2**20:.1f} MiB resident" in printed
    layer = compression["layers"][0]
    assert set(layer) >= {
        "name",
        "k",
        "s",
        "rank",
        "compression_ratio",
        "whitened_error",
        "seconds",
        "stored_bytes",
        "dense_bytes",
    }
    assert report["dense_perplexity"]["n_tokens"] == 2 * 31
    model, tokenizer = load_compressed(out)
    assert tokenizer is not None
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == (
        "DictionaryTensor" if method == "cospadi" else "LowRankTensor"
    )

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "14 Linear weights" in info and f"method {method}" in info

    assert main(["eval", str(out), "--seq-len", "32", "--eval-windows", "2"]) == 0
    evaluated = capsys.readouterr().out
    assert f"{report['compressed_perplexity']['ppl']:.3f}" in evaluated


def test_existing_output_is_refused_without_overwrite(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["compress", "--model", str(tiny_model_dir), "--output", str(out), *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "--model", "/no/such/model"], "no such file or folder"),
        (["compress", "--seq-len", "100000", "--no-eval"], "context length"),
        (["info", "/no/such/dir"], "not a spadi-ao model directory"),
    ],
)
def test_bad_input_gives_one_line_error(argv, message, tiny_model_dir, capsys):
    if "--seq-len" in argv:
        argv = argv[:1] + ["--model", str(tiny_model_dir)] + argv[1:]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


def test_ratio_out_of_range_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--ratio", "1.5"])
    assert exit_info.value.code == 2
    assert "must be in (0, 1)" in capsys.readouterr().err


def test_sequential_resumable_compress(tmp_path, tiny_model_dir):
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    argv = [
        "compress",
        "--model",
        str(tiny_model_dir),
        "--sequential",
        "--propagate",
        "compressed",
        "--no-eval",
        "--checkpoint-dir",
        str(checkpoints),
        "--output",
        str(out),
        *FAST,
        *PER_LAYER,
    ]
    assert main(argv) == 0
    assert len(json.loads((checkpoints / "manifest.json").read_text())["layers"]) == 14
    first = load_compressed(out)[0].model.layers[1].mlp.down_proj.weight.values.clone()
    assert main(argv + ["--overwrite"]) == 0  # everything restored from the checkpoint
    assert torch.equal(load_compressed(out)[0].model.layers[1].mlp.down_proj.weight.values, first)


def test_sequential_device_flag_reaches_the_block_driver(tmp_path, tiny_model_dir):
    common = ["compress", "--model", str(tiny_model_dir), "--sequential", "--no-eval", *FAST, *PER_LAYER]
    assert main(common + ["--output", str(tmp_path / "plain")]) == 0
    assert main(common + ["--device", "cpu", "--output", str(tmp_path / "on-device")]) == 0
    plain, on_device = (
        load_compressed(tmp_path / name)[0].model.layers[1].mlp.down_proj.weight for name in ("plain", "on-device")
    )
    assert torch.equal(plain.values, on_device.values) and torch.equal(plain.dictionary, on_device.dictionary)


def test_blended_calibration_and_config_flags_reach_the_report(tmp_path, tiny_model_dir, stdlib_text):
    other = tmp_path / "other.txt"
    other.write_text(stdlib_text[-20_000:])
    out = tmp_path / "out"
    argv = [
        "compress",
        "--model",
        str(tiny_model_dir),
        "--calibration",
        "stdlib",
        str(other),
        "--calibration-weights",
        "1",
        "2",
        "--n-samples",
        "6",
        "--gram-shrinkage",
        "0.25",
        "--solver",
        "fast",
        "--allocation",
        "knapsack",
        "--grouping",
        "inputs",
        "--no-eval",
        "--output",
        str(out),
        "--seq-len",
        "32",
    ]
    assert main(argv) == 0
    report = json.loads((out / "spadi_report.json").read_text())
    layers = report["compression"]["layers"]
    assert {layer["gram_shrinkage"] for layer in layers} == {0.25}
    assert len({layer["compression_ratio"] for layer in layers}) > 1  # the knapsack gave layers different ratios
    assert report["compression"]["compression_ratio"] >= 0.3 - 1e-9
    assert report["compression"]["calibration_tokens"] == 6 * 32
    model = load_compressed(out)[0]
    attention = model.model.layers[0].self_attn
    assert (
        attention.q_proj.weight.dictionary.untyped_storage().data_ptr()
        == attention.k_proj.weight.dictionary.untyped_storage().data_ptr()
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--calibration", "stdlib", "wikitext2-valid", "--calibration-weights", "1"],
            "--calibration-weights gives 1 weights for 2",
        ),
        (["--method", "svd-llm", "--grouping", "inputs"], "--method cospadi only"),
        (["--method", "svd-llm", "--solver", "fast"], "--solver applies to --method cospadi only"),
        (["--sequential", "--grouping", "paper"], "need groups inside one block (grouping='inputs')"),
        (["--device", "cpu"], "--device moves one decoder block at a time to it: it needs --sequential"),
    ],
)
def test_calibration_and_method_mismatches_are_clear_errors(extra, message, tmp_path, tiny_model_dir, capsys):
    assert (
        main(
            ["compress", "--model", str(tiny_model_dir), "--no-eval", "--output", str(tmp_path / "out"), *FAST, *extra]
        )
        == 2
    )
    assert message in capsys.readouterr().err


def test_gram_shrinkage_out_of_range_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--gram-shrinkage", "1.5"])
    assert "'auto' or a float in [0, 1]" in capsys.readouterr().err


def test_cli_defaults_are_the_measured_best_for_cospadi_and_the_plain_baseline_otherwise():
    from spadi_ao import DictionaryConfig, LowRankConfig
    from spadi_ao.cli import _config, build_parser

    def config(*argv):
        return _config(build_parser().parse_args(["compress", *argv]))

    best = config()
    assert best == DictionaryConfig()  # the CLI takes the config's defaults as they are
    assert (best.allocation, best.solver, best.grouping, best.gram_shrinkage, best.output_weighting) == (
        "knapsack",
        "procrustes",
        "inputs",
        0.3,
        "loss",
    )
    assert config("--sequential") == DictionaryConfig()  # the same knapsack and groups, block by block
    parser = build_parser()
    default = inspect.signature(sparsify_dictionary_).parameters["propagate"].default
    assert parser.parse_args(["compress"]).propagate == default == "compressed"  # rule 9's choice, as in the API
    assert [parser.parse_args(["compress", "--propagate", p]).propagate for p in PROPAGATIONS] == list(PROPAGATIONS)
    baseline = config("--method", "svd-llm")
    assert baseline == LowRankConfig() and baseline.allocation == "uniform"
    paper = config(
        "--allocation",
        "uniform",
        "--grouping",
        "none",
        "--solver",
        "ksvd",
        "--init",
        "random-columns",
        "--iterations",
        "60",
        "--gram-shrinkage",
        "0",
        "--output-weighting",
        "none",
    )
    assert paper == DictionaryConfig.paper()
    plain = config("--allocation", "uniform", "--grouping", "none", "--solver", "ksvd")
    assert (plain.allocation, plain.grouping, plain.solver) == ("uniform", None, "ksvd")


def test_help_defaults_are_the_configs_own():
    from spadi_ao.cli import _CONFIG_DEFAULTS

    config = DictionaryConfig()
    assert _CONFIG_DEFAULTS == {name: getattr(config, name) for name in _CONFIG_DEFAULTS}
