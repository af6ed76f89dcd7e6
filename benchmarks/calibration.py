"""Calibration transfer: which text the Grams come from vs which text the model is evaluated on.

    python benchmarks/calibration.py                          # source x evaluation matrix at CR 0.3
    python benchmarks/calibration.py --sizes 8 32 128         # also a calibration-size sweep
    python benchmarks/calibration.py --sources blend --name calibration-best    # DictionaryConfig() (the default)
    python benchmarks/calibration.py --one-shot --allocation uniform           # the first tables' one-shot setting

Calibration sources: WikiText-2 validation and the stdlib corpus (its calibration part), "blend" (half
of each), "generated" (the model's own text, see ``generated_batches``) and "stdlib+generated" (half
stdlib, half generated); evaluation: WikiText-2 test and the stdlib held-out part. Methods: CoSpaDi and SVD-LLM, each
with ``gram_shrinkage`` 0 and "auto". Writes benchmarks/results/calibration.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import ONE_SHOT, RESULTS, environment, evaluate, fresh_copy, load_default, write_json

from spadi_ao import DictionaryConfig, LowRankConfig, sparsify_dictionary_
from spadi_ao.allocation import output_sensitivity
from spadi_ao.api import select_linears
from spadi_ao.calibration import GramCollector, run_calibration
from spadi_ao.pipeline.data import calibration_batches, load_text, mix_calibration, split_text

SOURCES = {
    "wikitext2-valid": lambda: load_text("wikitext2-valid"),
    "stdlib": lambda: split_text(load_text("stdlib"))[0],
}
BLEND = {"stdlib": 0.5, "wikitext2-valid": 0.5}
"""The 'blend' source: half the sequences from each (``mix_calibration``), what a user mixing their own text
with a generic one gets."""
GENERATED = ("generated", "stdlib+generated")
EVALUATIONS = {
    "wikitext2-test": lambda: load_text("wikitext2-test"),
    "stdlib-held-out": lambda: split_text(load_text("stdlib"))[1],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--shrinkage", nargs="+", default=["0", "auto"])
    parser.add_argument("--methods", nargs="+", default=["cospadi", "svd-llm"])
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[], help="calibration-size sweep (stdlib source, auto shrinkage)"
    )
    parser.add_argument("--sources", nargs="*", default=list(SOURCES), choices=[*SOURCES, "blend", *GENERATED])
    parser.add_argument(
        "--one-shot",
        action="store_true",
        help="cospadi: the one-shot setting of the first tables (benchmarks/common.py: ONE_SHOT)",
    )
    parser.add_argument(
        "--allocation", choices=["uniform", "knapsack"], default=None, help="both methods (default: the config's)"
    )
    parser.add_argument("--solver", choices=["ksvd", "fast"], default=None, help="cospadi (default: the config's)")
    parser.add_argument(
        "--grouping", choices=["paper", "inputs", "none"], default=None, help="cospadi (default: the config's)"
    )
    parser.add_argument(
        "--sensitivity-samples", type=int, default=8, help="knapsack: calibration sequences for the loss sensitivity"
    )
    parser.add_argument("--name", default="calibration", help="writes benchmarks/results/<name>.{json,md,png}")
    return parser.parse_args()


def config_for(method: str, shrinkage: str, args: argparse.Namespace):
    """The config's defaults (``DictionaryConfig()`` / ``LowRankConfig()``) but for the flags given."""
    value = shrinkage if shrinkage == "auto" else float(shrinkage)
    common = dict(compression_ratio=args.ratio, gram_shrinkage=value)
    if args.allocation is not None:
        common["allocation"] = args.allocation
    if method == "svd-llm":
        return LowRankConfig(**common)
    fields = dict(ONE_SHOT) if args.one_shot else {}
    fields.update(common)
    if args.solver is not None:
        fields["solver"] = args.solver
    if args.grouping is not None:
        fields["grouping"] = None if args.grouping == "none" else args.grouping
    return DictionaryConfig(**fields)


def generated_batches(
    model, tokenizer, n_samples: int, seq_len: int, seed: int = 0, batch: int = 16
) -> list[torch.Tensor]:
    """The model's own text: each sequence starts from a random non-special token and is sampled on
    (temperature 1, top-p 0.95), the data-free calibration of e.g. LLM-QAT. Needs no text at all."""
    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    sequences = []
    for start in range(0, n_samples, batch):
        first = vocabulary[torch.randint(len(vocabulary), (min(batch, n_samples - start), 1), generator=generator)]
        torch.manual_seed(seed + start)
        with torch.inference_mode():
            ids = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=seq_len - 1,
                                 min_new_tokens=seq_len - 1, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                                 pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        sequences += [row.view(1, -1) for row in ids]
    return sequences


def batches_for(source: str, tokenizer, n_samples: int, seq_len: int, model) -> list[torch.Tensor]:
    if source == "blend":
        return mix_calibration(list(BLEND.items()), tokenizer, n_samples, seq_len, load=lambda name: SOURCES[name]())
    if source == "generated":
        return generated_batches(model, tokenizer, n_samples, seq_len)
    if source == "stdlib+generated":
        half = n_samples // 2
        return calibration_batches(tokenizer, SOURCES["stdlib"](), half, seq_len) + generated_batches(
            model, tokenizer, n_samples - half, seq_len
        )
    return calibration_batches(tokenizer, SOURCES[source](), n_samples, seq_len)


def grams(model, batches: list[torch.Tensor]) -> GramCollector:
    with GramCollector(select_linears(model)) as collector:
        run_calibration(model, batches, progress=False)
    return collector


def run(model, tokenizer, calibration, method, shrinkage, eval_texts, args) -> dict:
    """``calibration``: (Grams, loss sensitivity or None) of one source."""
    collector, sensitivity = calibration
    compressed = fresh_copy(model)
    start = time.perf_counter()
    config = config_for(method, shrinkage, args)
    extra = {"sensitivity": sensitivity} if config.allocation == "knapsack" else {}
    report = sparsify_dictionary_(compressed, config, calibration=collector, progress=False, **extra)
    seconds = time.perf_counter() - start
    shrinkages = [layer.gram_shrinkage for layer in report.layers]
    row = {
        "method": method,
        "shrinkage": shrinkage,
        "compression_ratio": report.compression_ratio,
        "seconds": seconds,
        "chosen_shrinkage": {layer.name: layer.gram_shrinkage for layer in report.layers},
        "mean_shrinkage": sum(shrinkages) / len(shrinkages),
        "perplexity": {
            name: evaluate(compressed, tokenizer, text, args.seq_len, args.eval_windows)["ppl"]
            for name, text in eval_texts.items()
        },
    }
    return row


def calibrate(model, tokenizer, source: str, n_samples: int, args: argparse.Namespace):
    batches = batches_for(source, tokenizer, n_samples, args.seq_len, model)
    sensitivity = None
    if any(
        config_for(method, "auto", args).allocation == "knapsack" for method in args.methods
    ):  # interleaved so the sensitivity sees every source of a blend
        sample = batches[:: max(1, len(batches) // args.sensitivity_samples)][: args.sensitivity_samples]
        sensitivity = output_sensitivity(model, select_linears(model), sample)
    return grams(model, batches), sensitivity


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(dict.fromkeys(r["calibration"] for r in rows))
    labels = [f"{r['method']}\nshrink={r['shrinkage']}" for r in rows if r["calibration"] == sources[0]]
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
    dense = {
        name: evaluate(model, tokenizer, text, args.seq_len, args.eval_windows)["ppl"]
        for name, text in eval_texts.items()
    }
    print(f"dense: {dense}", flush=True)
    rows = []
    for source in args.sources:
        calibration = calibrate(model, tokenizer, source, args.n_samples, args)
        for method in args.methods:
            for shrinkage in args.shrinkage:
                row = run(model, tokenizer, calibration, method, shrinkage, eval_texts, args)
                row["calibration"] = source
                rows.append(row)
                print(
                    f"calib {source:16s} {method:8s} shrink {shrinkage:5s} (mean {row['mean_shrinkage']:.3f}): "
                    + ", ".join(f"{k} {v:.2f}" for k, v in row["perplexity"].items()),
                    flush=True,
                )
        del calibration
    sweep = []
    for size in args.sizes:
        calibration = calibrate(model, tokenizer, "stdlib", size, args)
        for method in args.methods:
            row = run(model, tokenizer, calibration, method, "auto", eval_texts, args)
            row["n_samples"] = size
            sweep.append(row)
            print(
                f"stdlib x{size:4d} {method:8s} auto: "
                + ", ".join(f"{k} {v:.2f}" for k, v in row["perplexity"].items()),
                flush=True,
            )
    payload = {
        "command": " ".join(["python", *sys.argv]),
        "ratio": args.ratio,
        "allocation": {method: config_for(method, "auto", args).allocation for method in args.methods},
        "blend": BLEND,
        "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
        "evaluation_windows": args.eval_windows,
        "cospadi": {
            field: str(getattr(config_for("cospadi", "auto", args), field))
            for field in ("solver", "fast_steps", "iterations", "atoms_per_step", "init", "grouping")
        },
        "dense": dense,
        "rows": rows,
        "size_sweep": sweep,
        "environment": environment(),
    }
    write_json(RESULTS / f"{args.name}.json", payload)
    cospadi = config_for("cospadi", "auto", args)
    lines = [
        f"CR {args.ratio} (cospadi: allocation {cospadi.allocation}, solver {cospadi.solver}, grouping "
        f"{cospadi.grouping}), calibration {args.n_samples} x {args.seq_len}, evaluation first "
        f"{args.eval_windows} x {args.seq_len} tokens. "
        f"Dense: " + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()),
        "",
        "| calibration | method | gram_shrinkage | mean chosen | " + " | ".join(f"PPL {k}" for k in EVALUATIONS) + " |",
        "|---|---|---|---|" + "---|" * len(EVALUATIONS),
    ]
    for row in rows:
        lines.append(
            f"| {row['calibration']} | {row['method']} | {row['shrinkage']} | {row['mean_shrinkage']:.3f} | "
            + " | ".join(f"{row['perplexity'][k]:.2f}" for k in EVALUATIONS)
            + " |"
        )
    if sweep:
        lines += [
            "",
            "| stdlib sequences | method | " + " | ".join(f"PPL {k}" for k in EVALUATIONS) + " |",
            "|---|---|" + "---|" * len(EVALUATIONS),
        ]
        for row in sweep:
            lines.append(
                f"| {row['n_samples']} | {row['method']} | "
                + " | ".join(f"{row['perplexity'][k]:.2f}" for k in EVALUATIONS)
                + " |"
            )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if rows:
        plot(rows, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
