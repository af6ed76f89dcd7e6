"""``spadi-ao``: compress a causal LM, evaluate it, inspect a saved result.

``spadi-ao compress`` with no arguments is the main job: the embedded SmolLM2-135M-Instruct at CR 0.3,
calibrated on the offline stdlib corpus, perplexity printed before and after, result saved.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import torch

__all__ = ["main", "build_parser"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_ITEM_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


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
    parser.add_argument("--eval-text", default=None, help="evaluation text: 'stdlib' (held-out part, default), a file/dir, 'wikitext2-test', 'hf:NAME[:CONFIG[:SPLIT]]'")
    parser.add_argument("--eval-windows", type=_positive, default=default_windows, help="evaluate the first N windows only (default: %(default)s; all when omitted)")
    parser.add_argument("--seq-len", type=_positive, default=512, help="tokens per calibration sample and evaluation window")
    parser.add_argument("--batch-size", type=_positive, default=4)
    parser.add_argument("--word-level", action="store_true", help="also report lm-eval's word perplexity")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spadi-ao", description="Sparse dictionary (CoSpaDi) compression of causal LMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    compress = commands.add_parser("compress", help="compress a model and save it with a JSON report")
    compress.add_argument("--model", default=None, help="embedded default (SmolLM2-135M-Instruct), a .gguf file, a local HF folder or a hub id")
    compress.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    compress.add_argument("--method", choices=["cospadi", "svd-llm"], default="cospadi")
    compress.add_argument("--ratio", type=_ratio, default=0.3, help="compression ratio in (0, 1): fraction of Linear bytes removed")
    compress.add_argument("--calibration", nargs="+", default=None, metavar="SOURCE",
                          help="calibration text(s): 'stdlib' (default, calibration part), a file/dir, 'wikitext2-valid', 'hf:...'; "
                               "several sources are blended by --calibration-weights")
    compress.add_argument("--calibration-weights", type=float, nargs="+", default=None, metavar="W",
                          help="share of the calibration sequences per --calibration source (default: equal)")
    compress.add_argument("--n-samples", type=_positive, default=32, help="calibration sequences (in all, across sources)")
    compress.add_argument("--gram-shrinkage", type=_shrinkage, default="auto", help="float in [0, 1] or 'auto' (default): shrink Grams toward their diagonal")
    compress.add_argument("--rho", type=float, default=2.0, help="atoms per non-zero, k/s (cospadi)")
    compress.add_argument("--iterations", type=int, default=0, help="K-SVD iterations after the SVD-initialised coding (paper: 60)")
    compress.add_argument("--power-iterations", type=_positive, default=8)
    compress.add_argument("--atoms-per-step", type=_positive, default=8, help="OMP atoms per step (1 = exact OMP)")
    compress.add_argument("--init", choices=["svd", "random-columns"], default="svd")
    compress.add_argument("--solver", choices=["ksvd", "fast"], default="fast", help="cospadi: the fast closed-form refits (default) or K-SVD (the paper's)")
    compress.add_argument("--allocation", choices=["uniform", "knapsack"], default=None,
                          help="per-layer ratios: a knapsack over the whole-model budget (cospadi default) or uniform (svd-llm and --sequential default)")
    compress.add_argument("--grouping", choices=["inputs", "paper", "none"], default=None,
                          help="cospadi: layers sharing one dictionary: 'inputs' (default; q/k/v and gate/up of a block), 'paper', 'none' (--sequential default)")
    compress.add_argument("--damping", type=float, default=1e-2)
    compress.add_argument("--seed", type=int, default=42)
    compress.add_argument("--sequential", action="store_true", help="one decoder block at a time (bounded memory; also under torchrun)")
    compress.add_argument("--propagate", choices=["dense", "compressed"], default="compressed", help="activations later blocks calibrate on (sequential; compressed measured better)")
    compress.add_argument("--device", default=None,
                          help="sequential: solve each block on this device (e.g. cuda), the model staying where it loaded")
    compress.add_argument("--checkpoint-dir", default=None, help="resumable: finished layers are saved here and skipped on restart")
    compress.add_argument("--output", default=None, help="output directory (default: runs/<model>-<method>-cr<ratio>-<time>)")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    compress.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    _add_eval_arguments(compress, default_windows=16)

    evaluate = commands.add_parser("eval", help="perplexity of a dense or compressed model")
    evaluate.add_argument("model", nargs="?", default=None, help="a spadi-ao output dir, or any --model source of 'compress'")
    evaluate.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    _add_eval_arguments(evaluate, default_windows=None)

    info = commands.add_parser("info", help="what a saved compressed model holds")
    info.add_argument("path")
    return parser


def _load_any(source: Optional[str], dtype: torch.dtype):
    from spadi_ao.pipeline.models import load_model
    from spadi_ao.serialization import WEIGHTS_NAME, load_compressed

    if source is not None and (Path(source) / WEIGHTS_NAME).is_file():
        return load_compressed(source)
    return load_model(source, dtype=dtype)


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


def _calibration_batches(args: argparse.Namespace, tokenizer) -> list[torch.Tensor]:
    """``--n-samples`` windows, shared among the ``--calibration`` sources by ``--calibration-weights``."""
    from spadi_ao.pipeline.data import mix_calibration

    sources = args.calibration or ["stdlib"]
    weights = args.calibration_weights or [1.0] * len(sources)
    if len(weights) != len(sources):
        raise CLIError(f"--calibration-weights gives {len(weights)} weights for {len(sources)} --calibration sources")
    return mix_calibration(list(zip(sources, weights)), tokenizer, args.n_samples, args.seq_len, seed=args.seed, load=lambda s: _text(s, 0))


def _perplexity(model, tokenizer, text: str, args: argparse.Namespace, label: str) -> dict:
    from spadi_ao.pipeline.evaluate import perplexity

    start = time.perf_counter()
    result = perplexity(model, tokenizer, text, seq_len=args.seq_len, batch_size=args.batch_size, max_windows=args.eval_windows, word_level=args.word_level)
    line = f"{label}: perplexity {result.ppl:.3f} over {result.n_tokens} tokens ({result.n_windows} windows x {result.seq_len})"
    if result.word_ppl is not None:
        line += f", word perplexity {result.word_ppl:.3f}"
    print(f"{line} [{time.perf_counter() - start:.0f}s]", flush=True)
    return result.to_dict()


def _config(args: argparse.Namespace):
    from spadi_ao import DictionaryConfig, LowRankConfig

    # The measured best (README, "Beyond the paper") for CoSpaDi; the plain baseline for SVD-LLM. Knapsack
    # and grouping need the whole model at once, so --sequential defaults to neither.
    whole_model = args.method == "cospadi" and not args.sequential
    allocation = args.allocation or ("knapsack" if whole_model else "uniform")
    grouping = args.grouping or ("inputs" if whole_model else "none")
    common = dict(compression_ratio=args.ratio, damping=args.damping, seed=args.seed, gram_shrinkage=args.gram_shrinkage, allocation=allocation)
    if args.method == "svd-llm":
        if grouping != "none":
            raise CLIError("--grouping applies to --method cospadi only")
        return LowRankConfig(**common)
    return DictionaryConfig(
        rho=args.rho, iterations=args.iterations, power_iterations=args.power_iterations, atoms_per_step=args.atoms_per_step,
        init=args.init, solver=args.solver, grouping=None if grouping == "none" else grouping, **common,
    )


def _default_output(args: argparse.Namespace) -> Path:
    name = Path(args.model).stem if args.model else "smollm2-135m"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-{args.method}-cr{args.ratio:g}-{stamp}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _init_distributed() -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1) join the process group: gloo on CPU, NCCL on GPUs."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _compress(args: argparse.Namespace) -> int:
    from spadi_ao import compression_stats, sparsify_dictionary_
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
    model, tokenizer = _load_any(args.model, DTYPES[args.dtype])
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) in {time.perf_counter() - start:.0f}s", flush=True)
    if args.seq_len > model_context_length(model):
        raise CLIError(f"--seq-len {args.seq_len} exceeds the model's context length {model_context_length(model)}")
    eval_text = _text(args.eval_text, 1)
    batches = _calibration_batches(args, tokenizer)
    results: dict = {"model": args.model or "default:SmolLM2-135M-Instruct", "config": vars(args) | {"output": str(output)}}
    lead = _rank() == 0  # under torchrun every rank compresses; one evaluates and writes
    if not args.no_eval and lead:
        results["dense_perplexity"] = _perplexity(model, tokenizer, eval_text, args, "dense")
    report = sparsify_dictionary_(
        model, config, calibration=batches, sequential=args.sequential, propagate=args.propagate, checkpoint_dir=args.checkpoint_dir,
        device=args.device,
    )
    resident = compression_stats(model)["compressed_resident_bytes"]
    print(f"compressed {len(report.layers)} Linears with {report.method}: ratio {report.compression_ratio:.4f} "
          f"({report.dense_bytes / 2**20:.1f} MiB -> {report.stored_bytes / 2**20:.1f} MiB stored, "
          f"{resident / 2**20:.1f} MiB resident) in {report.seconds:.0f}s", flush=True)
    results["compression"] = report.to_dict() | {"resident_bytes": resident}
    if not lead:
        return 0
    if not args.no_eval:
        results["compressed_perplexity"] = _perplexity(model, tokenizer, eval_text, args, "compressed")
    save_compressed(model, output, tokenizer=tokenizer, report=results, overwrite=args.overwrite)
    print(f"saved to {output} (report: {output / 'spadi_report.json'}) [total {time.perf_counter() - start:.0f}s]")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from spadi_ao.pipeline.models import model_context_length

    model, tokenizer = _load_any(args.model, DTYPES[args.dtype])
    if tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer saved beside it")
    if args.seq_len > model_context_length(model):
        raise CLIError(f"--seq-len {args.seq_len} exceeds the model's context length {model_context_length(model)}")
    eval_text = _text(args.eval_text, 1)
    _perplexity(model, tokenizer, eval_text, args, args.model or "default")
    return 0


def _info(args: argparse.Namespace) -> int:
    from spadi_ao.serialization import REPORT_NAME, read_manifest

    manifest, shapes = read_manifest(args.path)
    stored = sum(torch.Size(shape).numel() * _SAFETENSORS_ITEM_BYTES[dtype] for shape, dtype in shapes.values())
    kinds: dict[str, int] = {}
    for entry in manifest["subclasses"].values():
        kinds[entry["type"]] = kinds.get(entry["type"], 0) + 1
    print(f"{args.path}: {len(shapes)} stored tensors, {stored / 2**20:.2f} MiB on disk")
    for kind, count in sorted(kinds.items()):
        print(f"  {count} Linear weights as {kind}")
    report_file = Path(args.path) / REPORT_NAME
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        compression = report.get("compression", {})
        if compression:
            print(f"  method {compression['method']}, target ratio {compression['target_ratio']}, achieved {compression['compression_ratio']:.4f}")
        for key in ("dense_perplexity", "compressed_perplexity"):
            if key in report:
                print(f"  {key.replace('_', ' ')}: {report[key]['ppl']:.3f} ({report[key]['n_tokens']} tokens)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"compress": _compress, "eval": _eval, "info": _info}
    from spadi_ao.pipeline import PipelineError
    from spadi_ao.serialization import CheckpointError

    try:
        return handlers[args.command](args)
    except (CLIError, PipelineError, CheckpointError, FileExistsError, ValueError) as exc:
        print(f"spadi-ao {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
