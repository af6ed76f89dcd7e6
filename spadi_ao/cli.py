"""``spadi-ao``: compress a causal LM, evaluate it, inspect a saved result.

``spadi-ao compress`` with no arguments is the main job: the embedded SmolLM2-135M-Instruct at CR 0.3,
calibrated on the offline stdlib corpus, perplexity printed before and after, result saved.

Heavy modules (torch, transformers, the library itself) are imported by the subcommand that needs them, so
``spadi-ao --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "build_parser"]

DTYPES = ("bfloat16", "float16", "float32")
_SAFETENSORS_ITEM_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _shrinkage(text: str) -> float | str:
    if text == "auto":
        return text
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a float in [0, 1], got {text}")
    return value


def _add_eval_arguments(parser: argparse.ArgumentParser, default_windows: Optional[int]) -> None:
    parser.add_argument(
        "--eval-text",
        default=None,
        help=(
            "evaluation text: 'stdlib' (held-out part; used when omitted), a file/dir, 'wikitext2-test', "
            "'hf:NAME[:CONFIG[:SPLIT]]'"
        ),
    )
    parser.add_argument(
        "--eval-windows", type=_positive, default=default_windows, help="evaluate the first N windows only (None: all)"
    )
    parser.add_argument(
        "--seq-len", type=_positive, default=512, help="tokens per calibration sample and evaluation window"
    )
    parser.add_argument("--batch-size", type=_positive, default=4, help="evaluation windows per forward pass")
    parser.add_argument("--word-level", action="store_true", help="also report lm-eval's word perplexity")


# DictionaryConfig()'s defaults, written out so that --help imports no torch (tests/test_cli.py keeps them equal).
_CONFIG_DEFAULTS = {
    "gram_shrinkage": 0.3,
    "rho": 2.0,
    "solver": "procrustes",
    "fast_steps": 8,
    "iterations": 20,
    "power_iterations": 8,
    "atoms_per_step": 1,
    "init": "svd",
    "allocation": "knapsack",
    "grouping": "inputs",
    "output_weighting": "loss",
    "damping": 0.01,
}


def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="spadi-ao", description="Sparse dictionary (CoSpaDi) compression of causal LMs.", formatter_class=formatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser(
        "compress", help="compress a model and save it with a JSON report", formatter_class=formatter
    )
    compress.add_argument(
        "--model",
        default=None,
        help="embedded default (SmolLM2-135M-Instruct; used when omitted), a .gguf file, a local HF folder or a hub id",
    )
    compress.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="dtype the model is loaded and compressed in"
    )
    compress.add_argument(
        "--method",
        choices=["cospadi", "svd-llm"],
        default="cospadi",
        help="sparse dictionaries (CoSpaDi) or the low-rank SVD-LLM baseline",
    )
    compress.add_argument(
        "--ratio", type=_ratio, default=0.3, help="compression ratio in (0, 1): fraction of Linear bytes removed"
    )
    compress.add_argument(
        "--calibration",
        nargs="+",
        default=None,
        metavar="SOURCE",
        help="calibration text(s): 'stdlib' (default, calibration part), a file/dir, 'wikitext2-valid', 'hf:...'; "
        "several sources are blended by --calibration-weights",
    )
    compress.add_argument(
        "--calibration-weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="share of the calibration sequences per --calibration source (None: equal)",
    )
    compress.add_argument(
        "--n-samples", type=_positive, default=32, help="calibration sequences (in all, across sources)"
    )
    # Config fields left out keep the config's own defaults (DictionaryConfig() is the recommended setting);
    # the help names them from _CONFIG_DEFAULTS, so --help imports no torch.
    field = dict(default=argparse.SUPPRESS)
    d = _CONFIG_DEFAULTS
    compress.add_argument(
        "--gram-shrinkage",
        type=_shrinkage,
        **field,
        help=f"float in [0, 1] or 'auto': shrink Grams toward their diagonal (default: {d['gram_shrinkage']})",
    )
    compress.add_argument("--rho", type=float, **field, help=f"cospadi: atoms per non-zero, k/s (default: {d['rho']})")
    compress.add_argument(
        "--solver",
        choices=["fast", "ksvd", "procrustes"],
        **field,
        help=(
            "cospadi: the fast closed-form refits, K-SVD (the paper's) or orthonormal Procrustes dictionaries "
            f"(default: {d['solver']})"
        ),
    )
    compress.add_argument(
        "--fast-steps",
        type=int,
        **field,
        help=f"cospadi, fast / procrustes: least-squares refits on the final supports (default: {d['fast_steps']})",
    )
    compress.add_argument(
        "--iterations",
        type=int,
        **field,
        help=f"cospadi, procrustes / ksvd: solver rounds (default: {d['iterations']}; the paper's K-SVD: 60)",
    )
    compress.add_argument(
        "--power-iterations",
        type=_positive,
        **field,
        help=f"cospadi, K-SVD: power iterations per atom (default: {d['power_iterations']})",
    )
    compress.add_argument(
        "--atoms-per-step",
        type=_positive,
        **field,
        help=f"cospadi, K-SVD: OMP atoms per step, 1 = exact OMP (default: {d['atoms_per_step']})",
    )
    compress.add_argument(
        "--init",
        choices=["svd", "random-columns"],
        **field,
        help=f"cospadi, K-SVD: initial dictionary (default: {d['init']})",
    )
    compress.add_argument(
        "--allocation",
        choices=["uniform", "knapsack"],
        **field,
        help=(
            f"per-layer ratios: a knapsack over the whole-model budget or uniform (default: {d['allocation']} for "
            "cospadi, uniform for svd-llm)"
        ),
    )
    compress.add_argument(
        "--grouping",
        choices=["inputs", "paper", "none"],
        **field,
        help=(
            "cospadi: layers sharing one dictionary: 'inputs' (q/k/v and gate/up of a block), 'paper' (not with "
            f"--sequential), 'none' (default: {d['grouping']})"
        ),
    )
    compress.add_argument(
        "--output-weighting",
        choices=["loss", "none"],
        **field,
        help=(
            "cospadi: weigh each output's error in the solve by its loss sensitivity (with the knapsack's "
            f"sensitivity) or every output alike (default: {d['output_weighting']})"
        ),
    )
    compress.add_argument(
        "--damping", type=float, **field, help=f"Gram ridge, relative to its mean diagonal (default: {d['damping']})"
    )
    compress.add_argument("--seed", type=int, default=42, help="seed of the calibration sampling and the solvers")
    compress.add_argument(
        "--sequential", action="store_true", help="one decoder block at a time (bounded memory; also under torchrun)"
    )
    compress.add_argument(
        "--propagate",
        choices=["dense", "compressed", "corrected", "blended"],
        default="compressed",
        help="sequential: the activations later blocks calibrate on: the compressed model's (compressed) or the "
        "dense model's (dense), both pooled (blended), or the compressed model's with each Linear fitted to the "
        "dense model's outputs (corrected)",
    )
    compress.add_argument(
        "--device",
        default=None,
        help="sequential: solve each block on this device (e.g. cuda), the model staying where it loaded",
    )
    compress.add_argument(
        "--checkpoint-dir", default=None, help="resumable: finished layers are saved here and skipped on restart"
    )
    compress.add_argument(
        "--output", default=None, help="output directory (None: runs/<model>-<method>-cr<ratio>-<time>)"
    )
    compress.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    compress.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    _add_eval_arguments(compress, default_windows=16)

    evaluate = commands.add_parser(
        "eval",
        help="perplexity, or lm-eval zero-shot accuracy (--tasks), of a dense or compressed model",
        formatter_class=formatter,
    )
    evaluate.add_argument(
        "model",
        nargs="?",
        default=None,
        help=(
            "a spadi-ao output dir, a save_pretrained folder, or any --model source of 'compress' (None: the "
            "embedded default)"
        ),
    )
    evaluate.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype a dense model is loaded in")
    _add_eval_arguments(evaluate, default_windows=None)
    evaluate.add_argument(
        "--tasks",
        default=None,
        metavar="T1,T2,...",
        help="lm-eval-harness tasks, e.g. piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq: "
        "zero-shot accuracy instead of perplexity (needs pip install 'spadi-ao[eval]')",
    )
    evaluate.add_argument(
        "--limit", type=_positive, default=None, help="--tasks: the first N documents of each task (default: all)"
    )
    evaluate.add_argument(
        "--data-dir",
        default=None,
        help="--tasks: folder of local task files (piqa/, arc/, hellaswag/, winogrande/, boolq/); default "
        "$SPADI_AO_DATA/zeroshot where they are there, else lm-eval downloads the datasets",
    )
    evaluate.add_argument("--output", default=None, help="also write the report here as JSON")

    info = commands.add_parser(
        "info", help="what a saved compressed model holds and how it was compressed", formatter_class=formatter
    )
    info.add_argument("path", help="a spadi-ao compress output dir or a model.save_pretrained folder")
    return parser


def _load_any(source: Optional[str], dtype: str):
    import torch

    from spadi_ao.pipeline.models import load_model
    from spadi_ao.serialization import WEIGHTS_NAME, load_compressed

    if source is not None and (Path(source) / WEIGHTS_NAME).is_file():
        return load_compressed(source)
    return load_model(source, dtype=getattr(torch, dtype))


@functools.lru_cache(maxsize=1)
def _stdlib_parts() -> tuple[str, str]:
    """The stdlib corpus split once into its calibration and evaluation parts (read by both stages)."""
    from spadi_ao.pipeline.data import load_text, split_text

    return split_text(load_text("stdlib"))


def _text(source: Optional[str], part: int) -> str:
    """The text of ``source``; the stdlib corpus (the default) is split so calibration (part 0) and
    evaluation (part 1) never overlap."""
    from spadi_ao.pipeline.data import load_text

    if source in (None, "stdlib"):
        return _stdlib_parts()[part]
    return load_text(source)


def _calibration_batches(args: argparse.Namespace, tokenizer) -> list:
    """``--n-samples`` windows, shared among the ``--calibration`` sources by ``--calibration-weights``."""
    from spadi_ao.pipeline.data import mix_calibration

    sources = args.calibration or ["stdlib"]
    weights = args.calibration_weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise CLIError(f"--calibration-weights gives {len(weights)} weights for {len(sources)} --calibration sources")
    return mix_calibration(
        list(zip(sources, weights)), tokenizer, args.n_samples, args.seq_len, seed=args.seed, load=lambda s: _text(s, 0)
    )


def _perplexity(model, tokenizer, text: str, args: argparse.Namespace, label: str) -> dict:
    from spadi_ao.pipeline.evaluate import perplexity

    start = time.perf_counter()
    result = perplexity(
        model,
        tokenizer,
        text,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_windows=args.eval_windows,
        word_level=args.word_level,
    )
    line = (
        f"{label}: perplexity {result.ppl:.3f} over {result.n_tokens} tokens ({result.n_windows} windows x "
        f"{result.seq_len})"
    )
    if result.word_ppl is not None:
        line += f", word perplexity {result.word_ppl:.3f}"
    print(f"{line} [{time.perf_counter() - start:.0f}s]", flush=True)
    return result.to_dict()


_COMMON_FIELDS = ("gram_shrinkage", "allocation", "damping")
_COSPADI_FIELDS = (
    "rho",
    "solver",
    "fast_steps",
    "iterations",
    "power_iterations",
    "atoms_per_step",
    "init",
    "grouping",
    "output_weighting",
)


def _config(args: argparse.Namespace):
    """The config the flags give: only flags set on the command line override the config's own defaults."""
    from spadi_ao import DictionaryConfig, LowRankConfig

    given = {name: getattr(args, name) for name in _COMMON_FIELDS + _COSPADI_FIELDS if hasattr(args, name)}
    common = dict(compression_ratio=args.ratio, seed=args.seed)
    if args.method == "svd-llm":
        cospadi_only = [name for name in _COSPADI_FIELDS if name in given]
        if cospadi_only:
            raise CLIError(f"--{cospadi_only[0].replace('_', '-')} applies to --method cospadi only")
        return LowRankConfig(**common, **given)
    if given.get("grouping") == "none":
        given["grouping"] = None
    return DictionaryConfig(**common, **given)


def _default_output(args: argparse.Namespace) -> Path:
    name = Path(args.model).stem if args.model else "smollm2-135m"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{args.method}-cr{args.ratio:g}-{stamp}"


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _init_distributed() -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group: gloo on CPU, NCCL on GPUs."""
    import os

    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _compress(args: argparse.Namespace) -> int:
    from spadi_ao import compression_stats, sparsify_dictionary_
    from spadi_ao.integrations.transformers import compression_record
    from spadi_ao.pipeline.models import model_context_length
    from spadi_ao.serialization import save_compressed

    output = Path(args.output) if args.output else _default_output(args)
    if output.exists() and not args.overwrite:
        raise CLIError(f"output directory {output} exists; pass --overwrite to replace it")
    config = _config(args)
    if args.device is not None and not args.sequential:
        raise CLIError("--device moves one decoder block at a time to it: it needs --sequential")
    _init_distributed()
    start = time.perf_counter()
    model, tokenizer = _load_any(args.model, args.dtype)
    print(
        f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) in "
        f"{time.perf_counter() - start:.0f}s",
        flush=True,
    )
    if args.seq_len > model_context_length(model):
        raise CLIError(f"--seq-len {args.seq_len} exceeds the model's context length {model_context_length(model)}")
    eval_text = _text(args.eval_text, 1)
    batches = _calibration_batches(args, tokenizer)
    results: dict = {
        "model": args.model or "default:SmolLM2-135M-Instruct",
        "config": vars(args) | {"output": str(output)},
        "compression_config": {field.name: getattr(config, field.name) for field in dataclasses.fields(config)},
    }
    lead = _rank() == 0  # under torchrun every rank compresses; one evaluates and writes
    if not args.no_eval and lead:
        results["dense_perplexity"] = _perplexity(model, tokenizer, eval_text, args, "dense")
    report = sparsify_dictionary_(
        model,
        config,
        calibration=batches,
        sequential=args.sequential,
        propagate=args.propagate,
        checkpoint_dir=args.checkpoint_dir,
        device=args.device,
    )
    resident = compression_stats(model)["compressed_resident_bytes"]
    print(
        f"compressed {len(report.layers)} Linears with {report.method}: ratio {report.compression_ratio:.4f} "
        f"({report.dense_bytes / 2**20:.1f} MiB -> {report.stored_bytes / 2**20:.1f} MiB stored, "
        f"{resident / 2**20:.1f} MiB resident) in {report.seconds:.0f}s",
        flush=True,
    )
    results["compression"] = report.to_dict() | {"resident_bytes": resident}
    results["settings"] = compression_record(config, report)
    if not lead:
        return 0
    if not args.no_eval:
        results["compressed_perplexity"] = _perplexity(model, tokenizer, eval_text, args, "compressed")
    save_compressed(model, output, tokenizer=tokenizer, report=results, overwrite=args.overwrite)
    print(f"saved to {output} (report: {output / 'spadi_report.json'}) [total {time.perf_counter() - start:.0f}s]")
    return 0


def _zero_shot(model, tokenizer, args: argparse.Namespace) -> dict:
    """lm-eval's table and the papers' average for ``--tasks``."""
    from spadi_ao.pipeline.lm_eval_tasks import zero_shot

    start = time.perf_counter()
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    result = zero_shot(model, tokenizer, tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size)
    print(result.table)
    if result.average is not None:
        by_metric = {metric: [t for t, m in result.reported.items() if m == metric] for metric in ("acc_norm", "acc")}
        used = "; ".join(f"{metric}: {', '.join(names)}" for metric, names in by_metric.items() if names)
        print(
            f"average over {len(result.reported)} tasks ({used}): {result.average:.4f}; mean acc "
            f"{result.average_acc:.4f}"
        )
    print(f"[{time.perf_counter() - start:.0f}s]", flush=True)
    return result.to_dict()


def _eval(args: argparse.Namespace) -> int:
    from spadi_ao.pipeline.models import model_context_length

    if args.tasks is None and (args.limit is not None or args.data_dir is not None):
        raise CLIError("--limit and --data-dir apply to --tasks")
    model, tokenizer = _load_any(args.model, args.dtype)
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer saved beside it")
    report: dict = {"model": args.model or "default:SmolLM2-135M-Instruct"}
    if args.tasks is not None:
        report["zero_shot"] = _zero_shot(model, tokenizer, args)
    else:
        if args.seq_len > model_context_length(model):
            raise CLIError(f"--seq-len {args.seq_len} exceeds the model's context length {model_context_length(model)}")
        report["perplexity"] = _perplexity(model, tokenizer, _text(args.eval_text, 1), args, args.model or "default")
    if args.output is not None:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


def _int8_parts(layers: dict[str, Any]) -> dict[str, int]:
    """How many weights keep their dictionary / values as int8 (the manifest's inner dtypes)."""
    counts = {"dictionary": 0, "values": 0}
    for entry in layers.values():
        for name, spec in entry.get("tensors", {}).items():
            part = name.partition(".")[0]
            if part in counts and isinstance(spec, dict) and spec.get("dtype") == "int8" and not name.endswith("scale"):
                counts[part] += 1
    return counts


def _pretrained_manifest(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, tuple[list[int], str]]]:
    """A ``save_pretrained`` folder's per-weight layouts and compression record (config.json) and stored shapes."""
    from safetensors import safe_open

    from spadi_ao.serialization import CheckpointError

    config = json.loads((path / "config.json").read_text())
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != "spadi_ao":
        raise CheckpointError(
            f"{path} holds no spadi-ao compressed model: config.json has no spadi_ao quantization_config"
        )
    shapes: dict[str, tuple[list[int], str]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            shapes.update(
                {
                    key: (list(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                    for key in handle.keys()
                }
            )
    return quantization.get("layers", {}), quantization.get("compression", {}), shapes


def _show_settings(settings: dict[str, Any], calibration: Optional[str]) -> None:
    config = settings.get("config", {})
    achieved = settings.get("compression_ratio")
    achieved = f"{achieved:.4f}" if isinstance(achieved, float) else achieved
    print(
        f"  method {settings.get('method')} ({settings.get('config_type')}), target ratio "
        f"{settings.get('target_ratio')}, achieved {achieved}"
    )
    for key in (
        "solver",
        "allocation",
        "grouping",
        "gram_shrinkage",
        "rho",
        "iterations",
        "atoms_per_step",
        "init",
        "damping",
    ):
        if key in config:
            print(f"  {key}: {config[key]}")
    print(f"  calibration: {settings.get('calibration_tokens', 0)} tokens{f' of {calibration}' if calibration else ''}")


def _info(args: argparse.Namespace) -> int:
    from spadi_ao.serialization import REPORT_NAME, WEIGHTS_NAME, read_manifest

    path = Path(args.path)
    report_file = path / REPORT_NAME
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    if (path / WEIGHTS_NAME).is_file() or not (path / "config.json").is_file():
        manifest, shapes = read_manifest(path)
        layers, settings = manifest["subclasses"], report.get("settings", {})
    else:
        layers, settings, shapes = _pretrained_manifest(path)
    stored = sum(math.prod(shape) * _SAFETENSORS_ITEM_BYTES[dtype] for shape, dtype in shapes.values())
    kinds: dict[str, int] = {}
    for entry in layers.values():
        kinds[entry["type"]] = kinds.get(entry["type"], 0) + 1
    print(f"{args.path}: {len(shapes)} stored tensors, {stored / 2**20:.2f} MiB on disk")
    for kind, count in sorted(kinds.items()):
        print(f"  {count} Linear weights as {kind}")
    int8 = _int8_parts(layers)
    print(f"  int8 parts: dictionary in {int8['dictionary']} weights, values in {int8['values']} weights")
    if settings:
        cli = report.get("config", {})
        calibration = (
            f"{' + '.join(cli.get('calibration') or ['stdlib'])} ({cli.get('n_samples')} x {cli.get('seq_len')})"
            if cli
            else None
        )
        _show_settings(settings, calibration)
    elif report.get("compression"):
        compression = report["compression"]
        print(
            f"  method {compression['method']}, target ratio {compression['target_ratio']}, achieved "
            f"{compression['compression_ratio']:.4f}"
        )
    for key in ("dense_perplexity", "compressed_perplexity"):
        if key in report:
            print(f"  {key.replace('_', ' ')}: {report[key]['ppl']:.3f} ({report[key]['n_tokens']} tokens)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"compress": _compress, "eval": _eval, "info": _info}
    import spadi_ao

    spadi_ao.import_all()  # kernels and tensor types; the transformers quantizer follows transformers' import
    from spadi_ao.pipeline import PipelineError
    from spadi_ao.serialization import CheckpointError

    try:
        return handlers[args.command](args)
    except (CLIError, PipelineError, CheckpointError, FileExistsError, ValueError) as exc:
        print(f"spadi-ao {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
