"""Defaults chosen on validation text, never on test text: ``gram_shrinkage`` and the CLI's calibration source.

    python benchmarks/select_defaults.py --sources stdlib                  # one part per calibration source
    python benchmarks/select_defaults.py --sources wikitext2-valid-a
    python benchmarks/select_defaults.py --sources generated stdlib+generated
    python benchmarks/select_defaults.py --solvers --sources stdlib wikitext2-valid-a --shrinkage 0.3
    python benchmarks/select_defaults.py --weightings --sources stdlib wikitext2-valid-a --shrinkage 0.3
    python benchmarks/select_defaults.py --rhos --sources stdlib wikitext2-valid-a --shrinkage 0.3
    python benchmarks/select_defaults.py --propagations --sources stdlib wikitext2-valid-a --shrinkage 0.3
    python benchmarks/select_defaults.py --refits --sources stdlib wikitext2-valid-a --shrinkage 0.3
    python benchmarks/select_defaults.py --refit-propagations --sources stdlib wikitext2-valid-a --shrinkage 0.3
    python benchmarks/select_defaults.py --refit-propagations --eval-windows 24 \
        --propagate-values dense blended compressed --sources stdlib wikitext2-valid-a --shrinkage 0.3
    python benchmarks/select_defaults.py --decide                          # merge the parts, apply the rules

Every candidate runs the recommended settings (``DictionaryConfig(solver="fast", allocation="knapsack",
grouping="inputs")``, CR 0.3, 32 x 512 calibration tokens; ``--fast-steps`` refits, 2 for the
screening) with each ``--shrinkage`` value, and is scored on two validation texts unlike each other:
the second half of WikiText-2 *validation* and the stdlib corpus' held-out part. WikiText-2 test is
never read.

Calibration sources: ``stdlib`` (the corpus' calibration part), ``generated`` (the model's own sampled
text, ``calibration.generated_batches``), ``stdlib+generated`` (16 + 16) and ``wikitext2-valid-a`` (the
first half of WikiText-2 validation: the in-domain case; it needs a download, so it informs the
shrinkage only and is no candidate default source).

Rules (stated before the runs):
1. ``gram_shrinkage``: the value with the lowest geometric mean of perplexity over the four cells
   {stdlib, wikitext2-valid-a calibration} x {two validation texts}: out-of-domain and in-domain
   calibration, the two the quality table uses.
2. CLI default calibration source: among the sources needing no download, the lowest geometric mean over
   the two validation texts at the chosen shrinkage (the generated sources need only that value:
   ``--shrinkage <chosen>``).
3. Solver (``--solvers``, at the chosen shrinkage, every other setting the default's): the fast solver with
   the default's refits against the COMPOT-style ``solver="procrustes"`` (``--procrustes-iterations``), the
   lowest geometric mean over the same four cells.
4. Output weighting (``--weightings``, at the chosen shrinkage and solver, every other setting the default's):
   ``output_weighting="none"`` against ``"loss"`` (each output's error weighted by its loss sensitivity in
   the solve), the lowest geometric mean over the same four cells. Rules 1-3 solve unweighted, as they were
   decided before this rule existed, so their parts reproduce.
5. Atoms per non-zero (``--rhos``, at the chosen shrinkage, solver and weighting): ``rho`` in RHOS, the lowest
   geometric mean over the same four cells. At equal bytes a larger ``rho`` buys atoms with non-zeros.
6. Block-by-block propagation (``--propagations``, ``DictionaryConfig()`` at ``--ratio`` with
   ``sequential=True``, its loss sensitivity from all calibration sequences as the library computes it):
   ``propagate`` in PROPAGATIONS, the lowest geometric mean over the same four cells.
7. Refits after Procrustes (``--refits``, at the chosen shrinkage, solver, weighting and ``rho``): ``fast_steps``
   in REFITS, least-squares dictionary / code refits on the final supports (``spadi_ao.solvers.refit``), the
   lowest geometric mean over the same four cells. Rules 3 to 6 solve Procrustes without refits, as they were
   decided before this rule existed, so their parts reproduce.
8. Block-by-block propagation with the refits (``--refit-propagations``): rule 6 again with rule 7's choice,
   ``DictionaryConfig()`` as it is, the lowest geometric mean over the same four cells; its candidates,
   REFIT_PROPAGATIONS, add ``"blended"`` (both streams' Grams pooled) and ``"dense"`` (the whole-model
   transform's result, with the loss sensitivity from every calibration sequence as the library computes it,
   where rule 7's rows take ``--sensitivity-samples``) to rule 6's.
9. Rule 8 read on more text (``--refit-propagations --eval-windows 24 --propagate-values ...``): the candidates
   within 0.1 % of rule 8's lowest geometric mean are a tie its 8 windows cannot resolve; each is run again and
   read on 24 windows of each validation text (the stdlib held-out part has 20, read whole), the lowest
   geometric mean over the same four cells. Its choice is ``propagate``'s default.

Parts: benchmarks/results/select_defaults-<source>.json (``--solvers``: select_defaults-solver-<source>.json,
``--weightings``: select_defaults-weighting-<source>.json, ``--rhos``: select_defaults-rho-<source>.json,
``--propagations``: select_defaults-propagate-<source>.json, ``--refits``: select_defaults-refit-<source>.json,
``--refit-propagations``: select_defaults-refit-propagate-<source>.json; with ``--eval-windows N`` other than 8,
``-Nw-`` after the prefix, e.g. select_defaults-refit-propagate-24w-<source>.json),
saved after every candidate (a re-run resumes); the decision: select_defaults.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from calibration import generated_batches
from common import RESULTS, environment, evaluate, fresh_copy, load_default, write_json

from spadi_ao import DictionaryConfig, sparsify_dictionary_
from spadi_ao.allocation import output_sensitivity
from spadi_ao.api import select_linears
from spadi_ao.calibration import GramCollector, run_calibration
from spadi_ao.pipeline.data import calibration_batches, load_text, split_text

SOURCES = ("stdlib", "generated", "stdlib+generated", "wikitext2-valid-a")
NO_DOWNLOAD = ("stdlib", "generated", "stdlib+generated")
SHRINKAGE_SOURCES = ("stdlib", "wikitext2-valid-a")
SOLVERS = ("fast", "procrustes")
WEIGHTINGS = ("none", "loss")
RHOS = ("1.5", "2", "3", "4")
PROPAGATIONS = ("compressed", "corrected")
REFIT_PROPAGATIONS = PROPAGATIONS + ("blended", "dense")
REFITS = ("0", "8")
VALIDATION = ("wikitext2-valid-b", "stdlib-held-out")
EVAL_WINDOWS = 8
"""Windows of each validation text read by rules 1-8 (``--eval-windows``); rule 9 reads RULE_9_WINDOWS."""
RULE_9_WINDOWS = 24
GENERATED_CACHE = Path.home() / ".cache" / "spadi-ao"


def validation_texts() -> dict[str, str]:
    return {
        "wikitext2-valid-b": split_text(load_text("wikitext2-valid"), 0.5)[1],
        "stdlib-held-out": split_text(load_text("stdlib"))[1],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="*", default=[], choices=SOURCES)
    parser.add_argument("--shrinkage", nargs="+", default=["auto", "0", "0.3", "0.6"])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--eval-windows", type=int, default=EVAL_WINDOWS, help="first N windows of each validation text (or all it has)"
    )
    parser.add_argument("--fast-steps", type=int, default=2)
    parser.add_argument("--sensitivity-samples", type=int, default=8)
    parser.add_argument("--solvers", action="store_true", help="rule 3: compare SOLVERS at --shrinkage (one value)")
    parser.add_argument("--procrustes-iterations", type=int, default=20)
    parser.add_argument(
        "--weightings", action="store_true", help="rule 4: compare WEIGHTINGS at --shrinkage with the default solver"
    )
    parser.add_argument(
        "--rhos", action="store_true", help="rule 5: compare RHOS at --shrinkage with the default solver and weighting"
    )
    parser.add_argument("--rho-values", nargs="+", default=list(RHOS), choices=RHOS, help="rule 5's candidates to run")
    parser.add_argument(
        "--propagations", action="store_true", help="rule 6: compare PROPAGATIONS of the default, block by block"
    )
    parser.add_argument(
        "--refits", action="store_true", help="rule 7: compare REFITS after the default solver's Procrustes rounds"
    )
    parser.add_argument(
        "--refit-propagations",
        action="store_true",
        help="rule 8: rule 6 again (and blended, dense), with rule 7's refits (the default)",
    )
    parser.add_argument(
        "--propagate-values",
        nargs="+",
        default=list(REFIT_PROPAGATIONS),
        choices=REFIT_PROPAGATIONS,
        help="rule 8's (or 9's) candidates to run",
    )
    parser.add_argument("--decide", action="store_true", help="merge the parts present and apply the rules")
    return parser.parse_args()


def generated(model, tokenizer, n_samples: int, seq_len: int) -> list[torch.Tensor]:
    """The model's own text, sampled once and cached (sampling 32 x 512 tokens takes minutes on a CPU)."""
    path = GENERATED_CACHE / f"generated-{n_samples}x{seq_len}-seed0.pt"
    if path.is_file():
        return list(torch.load(path))
    batches = generated_batches(model, tokenizer, n_samples, seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.cat(batches), path)
    return batches


def batches_for(source: str, model, tokenizer, args: argparse.Namespace) -> list[torch.Tensor]:
    n, length = args.n_samples, args.seq_len
    if source == "stdlib":
        return calibration_batches(tokenizer, split_text(load_text("stdlib"))[0], n, length)
    if source == "wikitext2-valid-a":
        return calibration_batches(tokenizer, split_text(load_text("wikitext2-valid"), 0.5)[0], n, length)
    if source == "generated":
        return [row.view(1, -1) for row in generated(model, tokenizer, n, length)]
    half = n // 2  # stdlib+generated: the first half of the generated set (the same sampling seeds)
    return calibration_batches(tokenizer, split_text(load_text("stdlib"))[0], half, length) + [
        row.view(1, -1) for row in generated(model, tokenizer, n, length)[: n - half]
    ]


def candidate_config(
    args: argparse.Namespace,
    shrinkage: str,
    solver: str = "screening",
    weighting: str = "none",
    rho: str = "2",
    refits: str = "0",
) -> DictionaryConfig:
    """A candidate: the recommended settings with this shrinkage, solver (``screening``: ``--fast-steps``),
    output weighting, atoms per non-zero and, for Procrustes, refits after its rounds."""
    value = shrinkage if shrinkage == "auto" else float(shrinkage)
    common = dict(
        compression_ratio=args.ratio,
        gram_shrinkage=value,
        allocation="knapsack",
        grouping="inputs",
        output_weighting=weighting,
        rho=float(rho),
    )
    if solver == "procrustes":
        return DictionaryConfig(
            **common, solver="procrustes", iterations=args.procrustes_iterations, fast_steps=int(refits)
        )
    if solver == "fast":
        return DictionaryConfig(**common, solver="fast")
    return DictionaryConfig(**common, solver="fast", fast_steps=args.fast_steps, iterations=0)


def run_source(
    source: str, model, tokenizer, texts: dict[str, str], args: argparse.Namespace, part: dict, save
) -> None:
    """Every candidate not yet in ``part``; ``save()`` after each, so a run can be resumed.

    Candidates: each ``--shrinkage`` value, with ``--solvers`` each of SOLVERS at the one ``--shrinkage``, with
    ``--weightings`` each of WEIGHTINGS with the default solver, with ``--rhos`` each of RHOS with the default
    solver and weighting.
    """
    rows = part.setdefault("rows", [])
    default = DictionaryConfig()
    if args.solvers:
        done = {row["solver"] for row in rows}
        todo = [(args.shrinkage[0], solver, "none", "2", "0") for solver in SOLVERS if solver not in done]
    elif args.weightings:
        done = {row["output_weighting"] for row in rows}
        todo = [(args.shrinkage[0], default.solver, w, "2", "0") for w in WEIGHTINGS if w not in done]
    elif args.rhos:
        done = {row["rho"] for row in rows}
        weighting = default.output_weighting
        todo = [(args.shrinkage[0], default.solver, weighting, r, "0") for r in args.rho_values if r not in done]
    elif args.propagations or args.refit_propagations:
        field = "propagate" if args.propagations else "refit_propagate"
        done = {row[field] for row in rows}
        candidates = args.propagate_values if args.refit_propagations else PROPAGATIONS
        todo = [(args.shrinkage[0], propagate, None, None, None) for propagate in candidates if propagate not in done]
    elif args.refits:
        done = {row["refits"] for row in rows}
        todo = [
            (args.shrinkage[0], default.solver, default.output_weighting, f"{default.rho:g}", r)
            for r in REFITS
            if r not in done
        ]
    else:
        done = {row["shrinkage"] for row in rows}
        todo = [(shrinkage, "screening", "none", "2", "0") for shrinkage in args.shrinkage if shrinkage not in done]
    if not todo:
        return
    start = time.perf_counter()
    batches = batches_for(source, model, tokenizer, args)
    if args.propagations or args.refit_propagations:
        run_propagations(source, model, tokenizer, texts, args, part, save, batches, todo)
        return
    sample = batches[:: max(1, len(batches) // args.sensitivity_samples)][: args.sensitivity_samples]
    sensitivity = output_sensitivity(model, select_linears(model), sample)
    with GramCollector(select_linears(model)) as collector:
        run_calibration(model, batches, progress=False)
    part.update(source=source, calibration_seconds=time.perf_counter() - start)
    for shrinkage, solver, weighting, rho, refits in todo:
        config = candidate_config(args, shrinkage, solver, weighting, rho, refits)
        compressed = fresh_copy(model)
        start = time.perf_counter()
        report = sparsify_dictionary_(
            compressed, config, calibration=collector, sensitivity=sensitivity, progress=False
        )
        fields = {
            "shrinkage": shrinkage,
            **({"solver": solver} if args.solvers else {}),
            **({"output_weighting": weighting} if args.weightings else {}),
            **({"rho": rho} if args.rhos else {}),
            **({"refits": refits} if args.refits else {}),
        }
        label = f"{source:18s} shrinkage {shrinkage:5s} {solver:10s} {weighting:4s} rho {rho:3s} refits {refits}"
        record(part, save, fields, label, compressed, report, time.perf_counter() - start, tokenizer, texts, args)
        del compressed


def record(
    part: dict,
    save,
    fields: dict,
    label: str,
    compressed,
    report,
    seconds: float,
    tokenizer,
    texts: dict[str, str],
    args: argparse.Namespace,
) -> None:
    """A candidate's row (``fields``, its ratio, seconds and perplexity on each validation text), saved and
    printed."""
    perplexity = {
        name: evaluate(compressed, tokenizer, text, args.seq_len, args.eval_windows)["ppl"]
        for name, text in texts.items()
    }
    row = {**fields, "compression_ratio": report.compression_ratio, "seconds": seconds, "perplexity": perplexity}
    part["rows"].append(row)
    save()
    print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in perplexity.items()) + f" ({seconds:.0f}s)", flush=True)


def run_propagations(
    source: str,
    model,
    tokenizer,
    texts: dict[str, str],
    args: argparse.Namespace,
    part: dict,
    save,
    batches: list[torch.Tensor],
    todo: list[tuple],
) -> None:
    """Rules 6 and 8's candidates: ``DictionaryConfig()`` block by block from the calibration batches, one per
    ``propagate``; rule 6 without the refits after Procrustes, rule 8 with them."""
    field, refits = ("refit_propagate", {}) if args.refit_propagations else ("propagate", {"fast_steps": 0})
    for shrinkage, propagate, *_ in todo:
        config = DictionaryConfig(compression_ratio=args.ratio, gram_shrinkage=float(shrinkage), **refits)
        compressed = fresh_copy(model)
        start = time.perf_counter()
        report = sparsify_dictionary_(
            compressed, config, calibration=batches, sequential=True, propagate=propagate, progress=False
        )
        part.update(source=source)
        fields = {"shrinkage": shrinkage, field: propagate}
        label = f"{source:18s} {field} {propagate:10s}"
        record(part, save, fields, label, compressed, report, time.perf_counter() - start, tokenizer, texts, args)
        del compressed


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


COMPARISONS = {
    "solver": SOLVERS,
    "output_weighting": WEIGHTINGS,
    "rho": RHOS,
    "propagate": PROPAGATIONS,
    "refits": REFITS,
    "refit_propagate": REFIT_PROPAGATIONS,
    f"refit_propagate_{RULE_9_WINDOWS}_windows": REFIT_PROPAGATIONS,
}
"""Rules 3 to 9: the comparison, and its candidates."""
ROW_FIELD = {f"refit_propagate_{RULE_9_WINDOWS}_windows": "refit_propagate"}
"""The rows' field of a comparison not named after it (rule 9 re-reads rule 8's field)."""
PART_PREFIX = {
    "solver": "solver",
    "output_weighting": "weighting",
    "rho": "rho",
    "propagate": "propagate",
    "refits": "refit",
    "refit_propagate": "refit-propagate",
    f"refit_propagate_{RULE_9_WINDOWS}_windows": f"refit-propagate-{RULE_9_WINDOWS}w",
}


def compared_cells(field: str, shrinkage: str) -> dict[str, list[float]]:
    """A comparison's cells: each candidate's perplexities over SHRINKAGE_SOURCES x VALIDATION, where all were
    measured."""
    paths = [RESULTS / f"select_defaults-{PART_PREFIX[field]}-{source}.json" for source in SHRINKAGE_SOURCES]
    if not all(path.is_file() for path in paths):
        return {}
    key = ROW_FIELD.get(field, field)
    rows = [
        {row[key]: row["perplexity"] for row in json.loads(path.read_text())["rows"] if row["shrinkage"] == shrinkage}
        for path in paths
    ]
    return {
        candidate: [per_source[candidate][text] for per_source in rows for text in VALIDATION]
        for candidate in COMPARISONS[field]
        if all(candidate in per_source for per_source in rows)
    }


def comparison_lines(field: str, shrinkage: str, cells: dict[str, list[float]], chosen: str) -> list[str]:
    header = " | ".join(f"PPL {t}, {s}" for s in SHRINKAGE_SOURCES for t in VALIDATION)
    lines = ["", f"| {field}, gram_shrinkage {shrinkage} | {header} | geometric mean |"]
    lines.append("|---|" + "---|" * (len(SHRINKAGE_SOURCES) * len(VALIDATION) + 1))
    for candidate, values in cells.items():
        mark = " (chosen)" if candidate == chosen else ""
        lines.append(
            f"| {candidate} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {geometric_mean(values):.2f}{mark} |"
        )
    return lines


def decide(args: argparse.Namespace) -> None:
    parts = {source: json.loads((RESULTS / f"select_defaults-{source}.json").read_text()) for source in SOURCES
             if (RESULTS / f"select_defaults-{source}.json").is_file()}  # fmt: skip
    if not parts:
        raise SystemExit("no select_defaults-<source>.json parts yet: run --sources first")
    cells = {
        (source, row["shrinkage"], text): row["perplexity"][text]
        for source, part in parts.items()
        for row in part["rows"]
        for text in VALIDATION
    }
    if not all(source in parts for source in SHRINKAGE_SOURCES):
        raise SystemExit(f"the shrinkage rule needs the parts of {SHRINKAGE_SOURCES}")
    shrinkages = [
        s
        for s in args.shrinkage
        if all((source, s, text) in cells for source in SHRINKAGE_SOURCES for text in VALIDATION)
    ]
    by_shrinkage = {
        s: geometric_mean([cells[(source, s, text)] for source in SHRINKAGE_SOURCES for text in VALIDATION])
        for s in shrinkages
    }
    chosen = min(by_shrinkage, key=by_shrinkage.get)
    candidates = [source for source in NO_DOWNLOAD if (source, chosen, VALIDATION[0]) in cells]
    by_source = {
        source: geometric_mean([cells[(source, chosen, text)] for text in VALIDATION]) for source in candidates
    }
    source = min(by_source, key=by_source.get) if by_source else None
    dense = parts[next(iter(parts))]["dense"]
    payload = {
        "command": " ".join(["python", *sys.argv]),
        "rules": {
            "gram_shrinkage": (
                f"lowest geometric mean of perplexity over {list(SHRINKAGE_SOURCES)} calibration x the validation texts"
            ),
            "calibration_source": (
                "among sources needing no download, lowest geometric mean over the validation texts at the chosen "
                "shrinkage"
            ),
        },
        "validation_texts": list(VALIDATION),
        "settings": parts[next(iter(parts))]["settings"],
        "dense": dense,
        "geometric_mean_by_shrinkage": by_shrinkage,
        "chosen_gram_shrinkage": chosen,
        "geometric_mean_by_source": by_source,
        "chosen_calibration_source": source,
        "calibration_seconds": {s: part["calibration_seconds"] for s, part in parts.items()},
        "cells": [{"source": s, "shrinkage": g, "text": t, "ppl": v} for (s, g, t), v in cells.items()],
    }
    comparisons = {field: compared_cells(field, chosen) for field in COMPARISONS}
    for field, cells in comparisons.items():
        if cells:
            means = {candidate: geometric_mean(values) for candidate, values in cells.items()}
            payload[f"geometric_mean_by_{field}"] = means
            payload[f"chosen_{field}"] = min(means, key=means.get)
    write_json(RESULTS / "select_defaults.json", payload)
    settings = payload["settings"]
    lines = [
        f"Selection on validation text only (CR {settings['ratio']}, knapsack + fast solver ({settings['fast_steps']} "
        f"refits) + shared-input groups, calibration {settings['n_samples']} x {settings['seq_len']}, first "
        f"{settings['eval_windows']} x {settings['seq_len']} tokens of each validation text). Dense: "
        + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()),
        "",
        "| calibration | gram_shrinkage | " + " | ".join(f"PPL {t}" for t in VALIDATION) + " | geometric mean |",
        "|---|---|" + "---|" * (len(VALIDATION) + 1),
    ]
    for s, part in parts.items():
        for row in part["rows"]:
            values = [row["perplexity"][t] for t in VALIDATION]
            lines.append(
                f"| {s} | {row['shrinkage']} | "
                + " | ".join(f"{v:.2f}" for v in values)
                + f" | {geometric_mean(values):.2f} |"
            )
    lines += ["", f"| gram_shrinkage | geometric mean, {' and '.join(SHRINKAGE_SOURCES)} calibration |", "|---|---|"]
    lines += [f"| {s} | {v:.2f}{' (chosen)' if s == chosen else ''} |" for s, v in by_shrinkage.items()]
    lines += ["", f"| calibration source (no download), gram_shrinkage {chosen} | geometric mean |", "|---|---|"]
    lines += [f"| {s} | {v:.2f}{' (chosen)' if s == source else ''} |" for s, v in by_source.items()]
    for field, cells in comparisons.items():
        if cells:
            lines += comparison_lines(field, chosen, cells, payload[f"chosen_{field}"])
    (RESULTS / "select_defaults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse_args()
    if args.decide:
        decide(args)
        return
    torch.manual_seed(0)
    model, tokenizer = load_default()
    texts = validation_texts()
    dense = {
        name: evaluate(model, tokenizer, text, args.seq_len, args.eval_windows)["ppl"] for name, text in texts.items()
    }
    print(f"dense: {dense}", flush=True)
    settings = {
        k: getattr(args, k)
        for k in ("ratio", "n_samples", "seq_len", "eval_windows", "fast_steps", "sensitivity_samples")
    }
    if args.solvers or args.weightings or args.rhos or args.propagations or args.refits or args.refit_propagations:
        if len(args.shrinkage) != 1:
            raise SystemExit(
                "--solvers, --weightings, --rhos, --propagations, --refits and --refit-propagations compare at one "
                "--shrinkage value "
                "(rule 1's choice)"
            )
        settings.update(fast_steps=DictionaryConfig().fast_steps, procrustes_iterations=args.procrustes_iterations)
    prefix = (
        "solver-"
        if args.solvers
        else "weighting-"
        if args.weightings
        else "rho-"
        if args.rhos
        else "propagate-"
        if args.propagations
        else "refit-"
        if args.refits
        else "refit-propagate-"
        if args.refit_propagations
        else ""
    )
    if args.eval_windows != EVAL_WINDOWS:  # a re-reading on more text keeps its own parts
        prefix = f"{prefix}{args.eval_windows}w-"
    for source in args.sources:
        path = RESULTS / f"select_defaults-{prefix}{source}.json"
        part = json.loads(path.read_text()) if path.is_file() else {}
        part.update(command=" ".join(["python", *sys.argv]), settings=settings, dense=dense, environment=environment())
        run_source(source, model, tokenizer, texts, args, part, lambda: write_json(path, part))


if __name__ == "__main__":
    main()
