"""Calibration transfer: which text the Grams come from vs which text the model is evaluated on.

    python benchmarks/calibration.py                          # source x evaluation matrix at CR 0.3
    python benchmarks/calibration.py --sizes 8 32 128         # also a calibration-size sweep

Calibration sources: WikiText-2 validation and the stdlib corpus (its calibration part); evaluation:
WikiText-2 test and the stdlib held-out part. Methods: CoSpaDi and SVD-LLM, each with
``gram_shrinkage`` 0 and "auto". Writes benchmarks/results/calibration.{json,md,png}.
"""

from __future__ import annotations

import argparse
import time

import torch

from spadi_ao import DictionaryConfig, LowRankConfig, sparsify_dictionary_
from spadi_ao.api import select_linears
from spadi_ao.calibration import GramCollector, run_calibration
from spadi_ao.pipeline.data import calibration_batches, load_text, split_text

from common import RESULTS, environment, evaluate, fresh_copy, load_default, write_json

SOURCES = {"wikitext2-valid": lambda: load_text("wikitext2-valid"), "stdlib": lambda: split_text(load_text("stdlib"))[0]}
EVALUATIONS = {"wikitext2-test": lambda: load_text("wikitext2-test"), "stdlib-held-out": lambda: split_text(load_text("stdlib"))[1]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--shrinkage", nargs="+", default=["0", "auto"])
    parser.add_argument("--methods", nargs="+", default=["cospadi", "svd-llm"])
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="calibration-size sweep (stdlib source, auto shrinkage)")
    return parser.parse_args()


def config_for(method: str, ratio: float, shrinkage: str):
    value = shrinkage if shrinkage == "auto" else float(shrinkage)
    if method == "svd-llm":
        return LowRankConfig(compression_ratio=ratio, gram_shrinkage=value)
    return DictionaryConfig(compression_ratio=ratio, gram_shrinkage=value, iterations=0, atoms_per_step=8)


def grams(model, tokenizer, text: str, n_samples: int, seq_len: int) -> GramCollector:
    with GramCollector(select_linears(model)) as collector:
        run_calibration(model, calibration_batches(tokenizer, text, n_samples, seq_len), progress=False)
    return collector


def run(model, tokenizer, collector, method, ratio, shrinkage, eval_texts, windows, seq_len) -> dict:
    compressed = fresh_copy(model)
    start = time.perf_counter()
    report = sparsify_dictionary_(compressed, config_for(method, ratio, shrinkage), calibration=collector, progress=False)
    seconds = time.perf_counter() - start
    shrinkages = [layer.gram_shrinkage for layer in report.layers]
    row = {
        "method": method,
        "shrinkage": shrinkage,
        "compression_ratio": report.compression_ratio,
        "seconds": seconds,
        "chosen_shrinkage": {layer.name: layer.gram_shrinkage for layer in report.layers},
        "mean_shrinkage": sum(shrinkages) / len(shrinkages),
        "perplexity": {name: evaluate(compressed, tokenizer, text, seq_len, windows)["ppl"] for name, text in eval_texts.items()},
    }
    return row


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}\nshrink={r['shrinkage']}" for r in rows if r["calibration"] == "wikitext2-valid"]
    sources = list(SOURCES)
    evaluations = list(EVALUATIONS)
    figure, axes = plt.subplots(1, len(evaluations), figsize=(5 * len(evaluations), 4), squeeze=False)
    for axis, evaluation in zip(axes[0], evaluations):
        grid = [[r["perplexity"][evaluation] for r in rows if r["calibration"] == source] for source in sources]
        image = axis.imshow(torch.tensor(grid).log10().numpy(), cmap="viridis")
        axis.set_xticks(range(len(labels)), labels, fontsize=7)
        axis.set_yticks(range(len(sources)), [f"calib: {s}" for s in sources])
        axis.set_title(f"PPL on {evaluation} (colour: log10)")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                axis.text(j, i, f"{value:.0f}", ha="center", va="center", color="white", fontsize=8)
        figure.colorbar(image, ax=axis, shrink=0.7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    model, tokenizer = load_default()
    eval_texts = {name: load() for name, load in EVALUATIONS.items()}
    dense = {name: evaluate(model, tokenizer, text, args.seq_len, args.eval_windows)["ppl"] for name, text in eval_texts.items()}
    print(f"dense: {dense}", flush=True)
    rows = []
    for source, load in SOURCES.items():
        collector = grams(model, tokenizer, load(), args.n_samples, args.seq_len)
        for method in args.methods:
            for shrinkage in args.shrinkage:
                row = run(model, tokenizer, collector, method, args.ratio, shrinkage, eval_texts, args.eval_windows, args.seq_len)
                row["calibration"] = source
                rows.append(row)
                print(f"calib {source:16s} {method:8s} shrink {shrinkage:5s} (mean {row['mean_shrinkage']:.3f}): "
                      + ", ".join(f"{k} {v:.2f}" for k, v in row["perplexity"].items()), flush=True)
        del collector
    sweep = []
    for size in args.sizes:
        collector = grams(model, tokenizer, SOURCES["stdlib"](), size, args.seq_len)
        for method in args.methods:
            row = run(model, tokenizer, collector, method, args.ratio, "auto", eval_texts, args.eval_windows, args.seq_len)
            row["n_samples"] = size
            sweep.append(row)
            print(f"stdlib x{size:4d} {method:8s} auto: " + ", ".join(f"{k} {v:.2f}" for k, v in row["perplexity"].items()), flush=True)
    payload = {
        "ratio": args.ratio,
        "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
        "evaluation_windows": args.eval_windows,
        "cospadi": {"iterations": 0, "atoms_per_step": 8, "init": "svd"},
        "dense": dense,
        "rows": rows,
        "size_sweep": sweep,
        "environment": environment(),
    }
    write_json(RESULTS / "calibration.json", payload)
    lines = [f"CR {args.ratio}, calibration {args.n_samples} x {args.seq_len}, evaluation first {args.eval_windows} x {args.seq_len} tokens. "
             f"Dense: " + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()), "",
             "| calibration | method | gram_shrinkage | mean chosen | " + " | ".join(f"PPL {k}" for k in EVALUATIONS) + " |",
             "|---|---|---|---|" + "---|" * len(EVALUATIONS)]
    for row in rows:
        lines.append(f"| {row['calibration']} | {row['method']} | {row['shrinkage']} | {row['mean_shrinkage']:.3f} | "
                     + " | ".join(f"{row['perplexity'][k]:.2f}" for k in EVALUATIONS) + " |")
    if sweep:
        lines += ["", "| stdlib sequences | method | " + " | ".join(f"PPL {k}" for k in EVALUATIONS) + " |", "|---|---|" + "---|" * len(EVALUATIONS)]
        for row in sweep:
            lines.append(f"| {row['n_samples']} | {row['method']} | " + " | ".join(f"{row['perplexity'][k]:.2f}" for k in EVALUATIONS) + " |")
    (RESULTS / "calibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, RESULTS / "calibration.png")


if __name__ == "__main__":
    main()
