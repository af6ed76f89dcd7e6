"""Quality: CoSpaDi vs SVD-LLM on SmolLM2-135M, same calibration Grams, WikiText-2 test perplexity.

    python benchmarks/quality.py                      # CR 0.2 0.3 0.4 0.5, both methods, DictionaryConfig()
    python benchmarks/quality.py --one-shot           # the one-shot CoSpaDi of the first tables
    python benchmarks/quality.py --variants uniform knapsack fast grouped --ratios 0.3 0.5 --name variants
    python benchmarks/quality.py --table                # the quality table: every row, ratio and calibration
    python benchmarks/quality.py --table --calibrations stdlib --ratios 0.3 --rows svd-llm compot default
    python benchmarks/quality.py --table --merge        # assemble the parts run so far

``--table``: calibration 32 x 512 tokens of each ``--calibrations`` source (the stdlib corpus'
calibration part, out of domain, and WikiText-2 validation, in domain), perplexity on the first 24 x 512
windows of WikiText-2 test, every row of TABLE_ROWS at every ratio with the library's default
``gram_shrinkage`` (or ``--gram-shrinkage``). Each (calibration, row, ratio) result is saved to
``<name>-<calibration>.json`` as soon as it is measured and a re-run skips the cells already there
(``--redo`` re-measures them), so the table can be run in pieces; ``--merge`` writes ``<name>.{json,md}``
from the parts.

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
from common import (
    MODEL,
    ONE_SHOT,
    RESULTS,
    calibration_grams,
    environment,
    evaluate,
    fresh_copy,
    load_default,
    protocol,
    write_json,
)

from spadi_ao import DictionaryConfig, LowRankConfig, sparsify_dictionary_
from spadi_ao.allocation import output_sensitivity
from spadi_ao.api import select_linears
from spadi_ao.calibration import GramCollector, run_calibration
from spadi_ao.pipeline.data import calibration_batches, load_text

TABLE_ROWS = (
    "dense",
    "svd-llm",
    "paper",
    "compot",
    "compot-spectral",
    "fast",
    "orthonormal",
    "default",
    "sequential",
    "sequential-corrected",
    "sequential-blended",
    "orthonormal-sequential",
    "orthonormal-sequential-corrected",
)
"""The quality table's rows. ``paper``: uniform K-SVD per layer, exact OMP (``--paper-iterations`` iterations after
the SVD-initialised coding); ``compot``: the COMPOT-style solver (orthonormal atoms,
``--procrustes-iterations``, no refits after them) per layer at a uniform ratio; ``compot-spectral``: the same
solver with COMPOT's kind of global allocation, spending the bytes where the whitened spectrum's discarded
energy is smallest, every output weighted alike (the knapsack without the loss sensitivity); ``fast``: the
default with the fast solver (closed-form refits) instead of Procrustes; ``orthonormal``: the default without
the refits after Procrustes (``fast_steps=0``); ``default``: ``DictionaryConfig()`` (Procrustes and
least-squares refits + loss-weighted knapsack + shared-input groups); ``sequential``: ``default`` block by
block with compressed propagation; ``sequential-corrected``: the same with ``propagate="corrected"`` (each
Linear fitted to the dense model's outputs); ``sequential-blended``: the same with ``propagate="blended"`` (each
Linear whitened with the dense and compressed streams' Grams pooled); ``orthonormal-sequential`` and
``orthonormal-sequential-corrected``: the first two with ``orthonormal``'s setting."""

SEQUENTIAL_ROWS = {
    "sequential": "compressed",
    "sequential-corrected": "corrected",
    "sequential-blended": "blended",
    "orthonormal-sequential": "compressed",
    "orthonormal-sequential-corrected": "corrected",
}
"""The rows run block by block, and their ``propagate``."""

TABLE_CALIBRATIONS = ("stdlib", "wikitext2-valid")


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

PROPAGATION = {
    "sequential-dense": "dense",
    "sequential-compressed": "compressed",
    "sequential-combined": "compressed",
    "sequential-combined-dense": "dense",
}
"""Variants run block by block (``sequential=True``) from the calibration batches, with this ``propagate``; the
knapsack ones get the same loss sensitivity as the one-shot variants, so only the propagation differs."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=["cospadi", "svd-llm"], choices=["cospadi", "svd-llm"])
    parser.add_argument(
        "--calibration", default="wikitext2-valid", help="calibration text source (never the test split)"
    )
    parser.add_argument(
        "--n-samples", type=int, default=None, help="calibration sequences (default 64; 32 with --table)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-text", default="wikitext2-test")
    parser.add_argument("--eval-windows", type=int, default=24, help="first N windows of the evaluation text")
    parser.add_argument(
        "--one-shot",
        action="store_true",
        help="--methods: CoSpaDi in the one-shot setting instead of DictionaryConfig()",
    )
    parser.add_argument(
        "--iterations", type=int, default=0, help="one-shot setting: K-SVD iterations after the SVD-initialised coding"
    )
    parser.add_argument("--atoms-per-step", type=int, default=8, help="one-shot setting: OMP atoms per step")
    parser.add_argument(
        "--gram-shrinkage", default=None, help="float in [0, 1] or 'auto' (default 0; --table: the library's default)"
    )
    parser.add_argument("--name", default="quality")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), help="compare these variants instead of --methods"
    )
    parser.add_argument(
        "--variant-ratios",
        nargs="*",
        default=[],
        metavar="VARIANT=CR,CR",
        help="run a variant at these ratios only, e.g. ksvd=0.3 (default: every --ratios)",
    )
    parser.add_argument("--ksvd-iterations", type=int, default=3, help="iterations of the 'ksvd' variant")
    parser.add_argument(
        "--sensitivity-samples",
        type=int,
        default=None,
        help="calibration sequences for the knapsack's loss sensitivity (default: all, as the library does)",
    )
    parser.add_argument(
        "--table", action="store_true", help="the quality table (TABLE_ROWS x --ratios x --calibrations)"
    )
    parser.add_argument("--rows", nargs="+", default=list(TABLE_ROWS), choices=TABLE_ROWS)
    parser.add_argument("--calibrations", nargs="+", default=list(TABLE_CALIBRATIONS), choices=TABLE_CALIBRATIONS)
    parser.add_argument(
        "--paper-iterations", type=int, default=0, help="K-SVD iterations of the 'paper' row (exact OMP)"
    )
    parser.add_argument(
        "--procrustes-iterations", type=int, default=20, help="Procrustes iterations of the COMPOT-style rows"
    )
    parser.add_argument("--merge", action="store_true", help="with --table: write <name>.{json,md} from the parts")
    parser.add_argument(
        "--redo", action="store_true", help="with --table: re-measure cells the parts already hold (default: resume)"
    )
    args = parser.parse_args()
    if args.n_samples is None:
        args.n_samples = 32 if args.table else 64
    if args.gram_shrinkage is None and not args.table:
        args.gram_shrinkage = "0"
    if args.table and args.name == "quality":
        args.name = "quality-table"
    return args


def config_for(method: str, ratio: float, args: argparse.Namespace, one_shot: bool = False):
    shrinkage = args.gram_shrinkage if args.gram_shrinkage == "auto" else float(args.gram_shrinkage)
    if method == "svd-llm":
        return LowRankConfig(compression_ratio=ratio, gram_shrinkage=shrinkage)
    if not one_shot:
        return DictionaryConfig(compression_ratio=ratio, gram_shrinkage=shrinkage)
    return DictionaryConfig(
        compression_ratio=ratio,
        gram_shrinkage=shrinkage,
        **{**ONE_SHOT, "iterations": args.iterations, "atoms_per_step": args.atoms_per_step},
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
    batches = calibration_batches(tokenizer, load_text(args.calibration), args.n_samples, args.seq_len)[
        : args.sensitivity_samples
    ]
    start = time.perf_counter()
    sensitivity = output_sensitivity(model, select_linears(model), batches)
    seconds = time.perf_counter() - start
    print(f"loss sensitivity over {len(batches)} sequences: {seconds:.0f}s", flush=True)
    return sensitivity, seconds


def run_variants(
    args: argparse.Namespace, model, tokenizer, eval_text: str, collector, dense: dict, calibration_seconds: float
) -> None:
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
                report = sparsify_dictionary_(
                    compressed, config, calibration=batches, sequential=True, propagate=PROPAGATION[variant], **extra
                )
            else:
                report = sparsify_dictionary_(compressed, config, calibration=collector, **extra)
            seconds = time.perf_counter() - start
            result = evaluate(compressed, tokenizer, eval_text, args.seq_len, args.eval_windows)
            rows.append(
                {
                    "variant": variant,
                    "config": {
                        k: v
                        for k, v in vars(config).items()
                        if k in ("allocation", "solver", "grouping", "iterations", "fast_steps")
                    },
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
            print(
                f"{variant:16s} CR {ratio:.2f} (achieved {report.compression_ratio:.4f}): ppl "
                f"{result['ppl']:.3f}, {seconds:.0f}s",
                flush=True,
            )
            del compressed
    payload = {
        **protocol(args, calibration_seconds, dense["n_tokens"]),
        "sensitivity": {"samples": args.sensitivity_samples or args.n_samples, "seconds": sensitivity_seconds},
        "cospadi": {
            "iterations": args.iterations,
            "atoms_per_step": args.atoms_per_step,
            "init": "svd",
            "rho": 2.0,
            "ksvd_variant_iterations": args.ksvd_iterations,
        },
        "dense": dense,
        "rows": rows,
        "environment": environment(),
    }
    write_json(RESULTS / f"{args.name}.json", payload)
    baseline = {row["target_ratio"]: row["perplexity"]["ppl"] for row in rows if row["variant"] == "uniform"}
    table = [
        "| variant | target CR | achieved CR | PPL | PPL vs uniform | mean whitened error | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ppl = row["perplexity"]["ppl"]
        versus = f"{ppl / baseline[row['target_ratio']] - 1:+.1%}" if row["target_ratio"] in baseline else "-"
        table.append(
            f"| {row['variant']} | {row['target_ratio']:.2f} | {row['compression_ratio']:.4f} | {ppl:.2f} | {versus} | "
            f"{row['mean_whitened_error']:.4f} | {row['compression_seconds']:.0f} |"
        )
    header = (
        f"Dense PPL {dense['ppl']:.2f}; WikiText-2 test, first {args.eval_windows} x {args.seq_len} "
        f"({dense['n_tokens']} predicted tokens); calibration {args.n_samples} x {args.seq_len} of {args.calibration} "
        f"(Grams once, {calibration_seconds:.0f}s); knapsack loss sensitivity from the first "
        f"{payload['sensitivity']['samples']} calibration sequences ({sensitivity_seconds:.0f}s, once, not in the "
        f"seconds column). One-shot settings: iterations={args.iterations}, atoms_per_step={args.atoms_per_step}; "
        f"'ksvd' runs {args.ksvd_iterations} K-SVD iterations."
    )
    (RESULTS / f"{args.name}.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    print(header)
    print("\n".join(table))
    plot(
        rows, dense["ppl"], RESULTS / f"{args.name}.png", key="variant", title="CoSpaDi variants at equal honest bytes"
    )


def table_config(row: str, ratio: float, args: argparse.Namespace):
    """The row's config at ``ratio``; every row shares the calibration, evaluation and shrinkage."""
    shrinkage = (
        {}
        if args.gram_shrinkage is None
        else {"gram_shrinkage": args.gram_shrinkage if args.gram_shrinkage == "auto" else float(args.gram_shrinkage)}
    )
    if row == "svd-llm":
        return LowRankConfig(compression_ratio=ratio, **shrinkage)
    per_layer = dict(allocation="uniform", grouping=None)
    procrustes = dict(solver="procrustes", iterations=args.procrustes_iterations, fast_steps=0)  # orthonormal
    fields = {
        "paper": dict(solver="ksvd", iterations=args.paper_iterations, atoms_per_step=1, init="svd", **per_layer),
        "compot": dict(procrustes, **per_layer),
        "compot-spectral": procrustes,
        "fast": dict(solver="fast"),
        "orthonormal": dict(fast_steps=0),
        "default": {},
        "sequential": {},
        "sequential-corrected": {},
        "sequential-blended": {},
        "orthonormal-sequential": dict(fast_steps=0),
        "orthonormal-sequential-corrected": dict(fast_steps=0),
    }[row]
    return DictionaryConfig(compression_ratio=ratio, **fields, **shrinkage)


def table_part(args: argparse.Namespace, calibration: str):
    return RESULTS / f"{args.name}-{calibration}.json"


def run_table(args: argparse.Namespace, model, tokenizer) -> None:
    """Every requested (calibration, ratio, row): compress a fresh copy, evaluate, save the part at once."""
    import json

    from spadi_ao.pipeline.data import split_text

    eval_text = load_text(args.eval_text)
    texts = {
        "stdlib": lambda: split_text(load_text("stdlib"))[0],
        "wikitext2-valid": lambda: load_text("wikitext2-valid"),
    }
    for calibration in args.calibrations:
        path = table_part(args, calibration)
        part = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        batches = calibration_batches(tokenizer, texts[calibration](), args.n_samples, args.seq_len)
        start = time.perf_counter()
        with GramCollector(select_linears(model)) as collector:
            run_calibration(model, batches, progress=False)
        grams_seconds = time.perf_counter() - start
        sensitivity = None
        part.update(calibration={"source": calibration, "n_samples": args.n_samples, "seq_len": args.seq_len,
                                 "grams_seconds": grams_seconds},
                    evaluation={"source": args.eval_text, "windows": args.eval_windows, "seq_len": args.seq_len},
                    environment=environment())  # fmt: skip
        if "dense" in args.rows and ("dense" not in part["rows"] or args.redo):
            part["rows"]["dense"] = evaluate(model, tokenizer, eval_text, args.seq_len, args.eval_windows)
            print(f"{calibration}: dense ppl {part['rows']['dense']['ppl']:.3f}", flush=True)
            path.write_text(json.dumps(part, indent=2))
        for ratio in args.ratios:
            for row in [r for r in args.rows if r != "dense"]:
                if str(ratio) in part["rows"].get(row, {}) and not args.redo:
                    continue  # measured by an earlier piece of the run
                config = table_config(row, ratio, args)
                if (
                    getattr(config, "allocation", "uniform") == "knapsack"
                    and row not in (*SEQUENTIAL_ROWS, "compot-spectral")
                    and sensitivity is None
                ):
                    start = time.perf_counter()  # one pass over the sequences the knapsack rows share
                    count = args.sensitivity_samples or len(batches)
                    sample = batches[:: max(1, len(batches) // count)][:count]
                    sensitivity = output_sensitivity(model, select_linears(model), sample)
                    part["sensitivity_seconds"] = time.perf_counter() - start
                    part["sensitivity_samples"] = len(sample)
                compressed = fresh_copy(model)
                start = time.perf_counter()
                try:
                    if row in SEQUENTIAL_ROWS:
                        report = sparsify_dictionary_(
                            compressed,
                            config,
                            calibration=batches,
                            sequential=True,
                            propagate=SEQUENTIAL_ROWS[row],
                            progress=False,
                        )
                    else:
                        extra = {}
                        if row == "compot-spectral":
                            alike = {name: torch.ones(m.out_features) for name, m in select_linears(model).items()}
                            extra["sensitivity"] = alike
                        elif getattr(config, "allocation", "uniform") == "knapsack":
                            extra["sensitivity"] = sensitivity
                        report = sparsify_dictionary_(
                            compressed, config, calibration=collector, progress=False, **extra
                        )
                except ValueError as error:  # a row this code does not support (e.g. knapsack in sequential mode)
                    print(f"{calibration} {row} CR {ratio}: unsupported here: {error}", flush=True)
                    part["rows"].setdefault(row, {})[str(ratio)] = {"unsupported": str(error)}
                    path.write_text(json.dumps(part, indent=2))
                    continue
                seconds = time.perf_counter() - start
                result = evaluate(compressed, tokenizer, eval_text, args.seq_len, args.eval_windows)
                part["rows"].setdefault(row, {})[str(ratio)] = {
                    "config": {k: (v if isinstance(v, (int, float, str, type(None), tuple)) else repr(v))
                               for k, v in vars(config).items()
                               if k not in ("layer_overrides", "allocation_candidates")},
                    **({"propagate": SEQUENTIAL_ROWS[row]} if row in SEQUENTIAL_ROWS else {}),
                    "compression_ratio": report.compression_ratio,
                    "stored_bytes": report.stored_bytes,
                    "dense_bytes": report.dense_bytes,
                    "perplexity": result,
                    # the one-shot knapsack rows' shared sensitivity pass: part's sensitivity_seconds
                    "compression_seconds": seconds,
                }  # fmt: skip
                path.write_text(json.dumps(part, indent=2))
                print(
                    f"{calibration} {row:16s} CR {ratio:.2f} (achieved {report.compression_ratio:.4f}): ppl "
                    f"{result['ppl']:.3f}, {seconds:.0f}s",
                    flush=True,
                )
                del compressed
        del collector


def merge_table(args: argparse.Namespace) -> None:
    """``<name>.{json,md}`` from the parts present: one table per calibration, rows x ratios."""
    import json

    parts = {
        c: json.loads(table_part(args, c).read_text()) for c in TABLE_CALIBRATIONS if table_part(args, c).is_file()
    }
    if not parts:
        raise SystemExit(f"no {args.name}-<calibration>.json parts: run --table first")
    ratios = sorted(
        {float(r) for part in parts.values() for row, cells in part["rows"].items() if row != "dense" for r in cells}
    )
    write_json(RESULTS / f"{args.name}.json",
               {"model": MODEL,
                "rows": list(TABLE_ROWS), "parts": parts})  # fmt: skip
    lines = []
    for calibration, part in parts.items():
        info = part["calibration"]
        dense = part["rows"].get("dense", {}).get("ppl")
        lines += [f"Calibration {info['n_samples']} x {info['seq_len']} tokens of {calibration}; WikiText-2 test, "
                  f"first {part['evaluation']['windows']} x {part['evaluation']['seq_len']} windows. PPL (seconds of "
                  "compression).", "",
                  "| row | " + " | ".join(f"CR {r:.1f}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]  # fmt: skip
        if dense is not None:
            lines.append("| dense | " + " | ".join(f"{dense:.2f}" for _ in ratios) + " |")
        for row in TABLE_ROWS[1:]:
            cells = part["rows"].get(row)
            if not cells:
                continue
            shown = []
            for r in ratios:
                cell = cells.get(str(r))
                if cell is None:
                    shown.append("-")
                elif "unsupported" in cell:
                    shown.append("unsupported")
                else:
                    shown.append(f"{cell['perplexity']['ppl']:.2f} ({cell['compression_seconds']:.0f} s)")
            lines.append(f"| {row} | " + " | ".join(shown) + " |")
        lines.append("")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    args = parse_args()
    if args.table and args.merge:
        merge_table(args)
        return
    torch.manual_seed(0)
    model, tokenizer = load_default()
    if args.table:
        run_table(args, model, tokenizer)
        return
    eval_text = load_text(args.eval_text)
    collector, calibration_seconds = calibration_grams(model, tokenizer, args.calibration, args.n_samples, args.seq_len)
    dense = evaluate(model, tokenizer, eval_text, args.seq_len, args.eval_windows)
    print(
        f"dense: ppl {dense['ppl']:.3f} over {dense['n_tokens']} tokens; calibration {calibration_seconds:.0f}s",
        flush=True,
    )
    if args.variants:
        run_variants(args, model, tokenizer, eval_text, collector, dense, calibration_seconds)
        return
    rows = []
    knapsack = any(
        config_for(method, args.ratios[0], args, args.one_shot).allocation == "knapsack" for method in args.methods
    )
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
            print(
                f"{method:8s} CR {ratio:.2f} (achieved {report.compression_ratio:.4f}): ppl {result['ppl']:.3f}, "
                f"word ppl {result['word_ppl']:.3f}, {seconds:.0f}s",
                flush=True,
            )
            del compressed
    payload = {
        **protocol(args, calibration_seconds, dense["n_tokens"]),
        "cospadi": {
            field.name: getattr(config_for("cospadi", args.ratios[0], args, args.one_shot), field.name)
            for field in dataclasses.fields(DictionaryConfig)
            if field.name not in ("compression_ratio", "layer_overrides", "dictionary_quantization")
        },
        "sensitivity": {"samples": args.sensitivity_samples or args.n_samples, "seconds": sensitivity_seconds},
        "gram_shrinkage": args.gram_shrinkage,
        "damping": 0.01,
        "dense": dense,
        "rows": rows,
        "environment": environment(),
    }
    write_json(RESULTS / f"{args.name}.json", payload)
    table = [
        "| CR | CoSpaDi PPL | SVD-LLM PPL | CoSpaDi / SVD-LLM | CoSpaDi s | SVD-LLM s |",
        "|---|---|---|---|---|---|",
    ]
    for ratio in args.ratios:
        by_method = {row["method"]: row for row in rows if row["target_ratio"] == ratio}
        c, s = by_method.get("cospadi"), by_method.get("svd-llm")
        if c and s:
            table.append(
                f"| {ratio:.1f} | {c['perplexity']['ppl']:.2f} | {s['perplexity']['ppl']:.2f} | "
                f"{c['perplexity']['ppl'] / s['perplexity']['ppl']:.2f} | {c['compression_seconds']:.0f} | "
                f"{s['compression_seconds']:.0f} |"
            )
    cospadi_setting = (
        "one-shot (iterations=%d, atoms_per_step=%d)" % (args.iterations, args.atoms_per_step)
        if args.one_shot
        else "DictionaryConfig()"
    )
    header = (
        f"Dense PPL {dense['ppl']:.2f}; WikiText-2 test, first {args.eval_windows} x {args.seq_len} "
        f"({dense['n_tokens']} predicted tokens); calibration {args.n_samples} x {args.seq_len} of {args.calibration}; "
        f"CoSpaDi {cospadi_setting}."
    )
    (RESULTS / f"{args.name}.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    print(header)
    print("\n".join(table))
    plot(rows, dense["ppl"], RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
