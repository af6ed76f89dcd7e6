"""Composition: CoSpaDi with torchao quantisation on SmolLM2-135M; bytes vs WikiText-2 perplexity (the Pareto picture).

    python benchmarks/compose.py                       # CR 0.3 and 0.5, each plain / int8 / int4 dictionary
    python benchmarks/compose.py --one-shot            # the committed table's one-shot CoSpaDi
    python benchmarks/compose.py --ratios 0.3 --eval-windows 4

Rows: dense, torchao alone (int8 weight-only per row; int4 weight-only in groups of 32), and CoSpaDi at each
ratio, plain, with an int8 dictionary and int8 codes, and with an int4 dictionary (groups of 32) and int8 codes.
Every method touches the same Linears (all projections; not the head, which SmolLM2 ties to its embedding),
and bytes are what the weights really hold (torchao's int4 keeps one value per int8 byte on CPU). Calibration
Grams are computed once; each ratio is compressed once and its quantised variants are derived from that copy
with ``quantize_dictionary_`` (bit-identical to passing the quantisation in ``DictionaryConfig``).
Writes benchmarks/results/compose.json, compose.md and compose.png.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from common import (
    ONE_SHOT,
    RESULTS,
    calibration_grams,
    environment,
    evaluate,
    fresh_copy,
    linear_bytes,
    load_default,
    protocol,
    write_json,
)
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_

from spadi_ao import DictionaryConfig, quantize_dictionary_, sparsify_dictionary_
from spadi_ao.allocation import output_sensitivity
from spadi_ao.api import select_linears
from spadi_ao.pipeline.data import calibration_batches, load_text

GROUP = 32


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument(
        "--calibration", default="wikitext2-valid", help="calibration text source (never the test split)"
    )
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default="wikitext2-test")
    parser.add_argument("--eval-windows", type=int, default=24, help="first N windows of the evaluation text")
    parser.add_argument(
        "--one-shot",
        action="store_true",
        help="CoSpaDi in the one-shot setting of the committed table instead of DictionaryConfig()",
    )
    parser.add_argument(
        "--sensitivity-samples", type=int, default=8, help="knapsack: calibration sequences for the loss sensitivity"
    )
    parser.add_argument("--gram-shrinkage", default="auto", help="float in [0, 1] or 'auto' (the library default)")
    return parser.parse_args()


def int8_config() -> Int8WeightOnlyConfig:
    return Int8WeightOnlyConfig(set_inductor_config=False)


def int4_config() -> IntxWeightOnlyConfig:
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP))


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = {"dense": ("k", "*"), "torchao": ("tab:blue", "s"), "cospadi": ("tab:orange", "o")}
    for row in rows:
        color, marker = styles[row["family"]]
        x, y = row["linear_bytes"] / 2**20, row["perplexity"]["ppl"]
        axis.scatter(x, y, color=color, marker=marker, s=50, zorder=3)
        axis.annotate(row["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front, best = [], float("inf")
    for row in sorted(rows, key=lambda r: r["linear_bytes"]):  # lowest PPL reached at or below each size
        if row["perplexity"]["ppl"] < best:
            best = row["perplexity"]["ppl"]
            front.append((row["linear_bytes"] / 2**20, best))
    axis.step(*zip(*front), where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
    axis.set_yscale("log")
    axis.set_xlabel("projection weights, MiB as stored")
    axis.set_ylabel("WikiText-2 test perplexity")
    axis.set_title("SmolLM2-135M-Instruct: CoSpaDi x torchao")
    axis.legend(loc="upper right")
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_default()
    names = list(select_linears(model))
    eval_text = load_text(args.eval_text)
    collector, calibration_seconds = calibration_grams(model, tokenizer, args.calibration, args.n_samples, args.seq_len)
    dense_bytes = linear_bytes(model, names)
    rows: list[dict] = []

    @functools.cache
    def sensitivity() -> dict:
        """The knapsack's loss sensitivity, once (its seconds are not in the rows')."""
        batches = calibration_batches(tokenizer, load_text(args.calibration), args.n_samples, args.seq_len)
        return output_sensitivity(model, select_linears(model), batches[: args.sensitivity_samples])

    def record(name: str, family: str, candidate: torch.nn.Module, seconds: float) -> None:
        result = evaluate(candidate, tokenizer, eval_text, args.seq_len, args.eval_windows)
        stored = linear_bytes(candidate, names)
        rows.append(
            {
                "name": name,
                "family": family,
                "linear_bytes": stored,
                "linear_ratio": 1 - stored / dense_bytes,
                "perplexity": result,
                "seconds": seconds,
            }
        )
        print(
            f"{name:40s} {stored / 2**20:7.2f} MiB ({1 - stored / dense_bytes:6.1%} smaller)  ppl "
            f"{result['ppl']:8.3f}  word ppl {result['word_ppl']:8.3f}  {seconds:5.0f}s",
            flush=True,
        )

    record("dense fp32", "dense", model, 0.0)
    for label, config in (("torchao int8", int8_config()), (f"torchao int4 g{GROUP}", int4_config())):
        candidate = fresh_copy(model)
        start = time.perf_counter()
        quantize_(candidate, config, filter_fn=lambda module, fqn: fqn in names)
        record(label, "torchao", candidate, time.perf_counter() - start)
        del candidate

    for ratio in args.ratios:
        compressed = fresh_copy(model)
        start = time.perf_counter()
        shrinkage = args.gram_shrinkage if args.gram_shrinkage == "auto" else float(args.gram_shrinkage)
        config = DictionaryConfig(
            compression_ratio=ratio, gram_shrinkage=shrinkage, **(ONE_SHOT if args.one_shot else {})
        )
        extra = {"sensitivity": sensitivity()} if config.allocation == "knapsack" else {}
        sparsify_dictionary_(compressed, config, calibration=collector, **extra)
        seconds = time.perf_counter() - start
        record(f"cospadi {ratio:.1f}", "cospadi", compressed, seconds)
        for label, dictionary in (("int8", int8_config()), (f"int4 g{GROUP}", int4_config())):
            candidate = fresh_copy(compressed)
            start = time.perf_counter()
            quantize_dictionary_(candidate, dictionary, values_dtype="int8")
            record(f"cospadi {ratio:.1f} + {label} dict, int8 codes", "cospadi", candidate, time.perf_counter() - start)
            del candidate
        del compressed

    dense = rows[0]["perplexity"]
    payload = {
        **protocol(args, calibration_seconds, dense["n_tokens"]),
        "linears": len(names),
        "dense_linear_bytes": dense_bytes,
        "cospadi": {
            "setting": "one-shot " + str(ONE_SHOT) if args.one_shot else "DictionaryConfig()",
            "gram_shrinkage": args.gram_shrinkage,
        },
        "quantization": {
            "int8": "Int8WeightOnlyConfig (per row)",
            "int4": f"IntxWeightOnlyConfig(int4, PerGroup({GROUP}))",
            "codes": "int8, symmetric per output row",
        },
        "rows": rows,
        "environment": environment(),
    }
    write_json(RESULTS / "compose.json", payload)
    table = ["| variant | projection MiB | smaller than dense | PPL | word PPL |", "|---|---|---|---|---|"]
    for row in rows:
        table.append(
            f"| {row['name']} | {row['linear_bytes'] / 2**20:.2f} | {row['linear_ratio']:.1%} | "
            f"{row['perplexity']['ppl']:.2f} | {row['perplexity']['word_ppl']:.2f} |"
        )
    header = (
        f"SmolLM2-135M-Instruct, {len(names)} projections ({dense_bytes / 2**20:.1f} MiB fp32). WikiText-2 test, first "
        f"{args.eval_windows} x {args.seq_len} ({dense['n_tokens']} predicted tokens); calibration {args.n_samples} x "
        f"{args.seq_len} of {args.calibration}; CoSpaDi "
        f"{'one-shot ' + str(ONE_SHOT) if args.one_shot else 'DictionaryConfig()'}, "
        f"gram_shrinkage={args.gram_shrinkage}. Bytes are what the weights hold: torchao's int4 keeps one value "
        f"per int8 byte on CPU plus a scale and zero point per group of {GROUP}."
    )
    (RESULTS / "compose.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    print(header)
    print("\n".join(table))
    plot(rows, RESULTS / "compose.png")


if __name__ == "__main__":
    main()
