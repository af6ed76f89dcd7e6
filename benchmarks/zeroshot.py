"""Zero-shot accuracy table from ``spadi-ao eval --tasks ... --output REPORT.json`` reports.

Each evaluation is its own CLI run (one model, or some of its tasks, per run keeps every run short); this
script puts their lm-eval numbers side by side (it reads JSON only: no model, no torch): per task the metric papers
report (``acc_norm`` where lm-eval defines it, else ``acc``), the average of those, and the average of plain ``acc``.

    python benchmarks/zeroshot.py dense=benchmarks/results/zeroshot-dense.json \\
        cospadi=benchmarks/results/zeroshot-cospadi.json svd-llm=benchmarks/results/zeroshot-svd-llm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def merge(parts: list[dict]) -> dict:
    """One model's reports from runs over different tasks, as one (the averages taken over all of them)."""
    merged = {
        key: {k: v for part in parts for k, v in part[key].items()}
        for key in ("results", "reported", "n_samples", "sources")
    }
    limits = {part["limit"] for part in parts}
    if len(limits) > 1:
        raise SystemExit(f"reports of one model use different --limit values {sorted(limits, key=str)}")
    reported = [merged["results"][t][f"{m},none"] for t, m in merged["reported"].items()]
    accs = [merged["results"][t]["acc,none"] for t in merged["reported"] if "acc,none" in merged["results"][t]]
    return {
        **merged,
        "limit": limits.pop(),
        "average": statistics.fmean(reported),
        "average_acc": statistics.fmean(accs),
    }


def table(reports: dict[str, dict]) -> str:
    first = next(iter(reports.values()))
    tasks = list(first["reported"])
    header = ["model", *(f"{t} ({first['reported'][t]})" for t in tasks), "average", "mean acc", "docs per task"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, report in reports.items():
        if report["reported"] != first["reported"]:
            raise SystemExit(f"{label}: tasks or metrics differ from the first report's")
        cells = [f"{100 * report['results'][t][report['reported'][t] + ',none']:.1f}" for t in tasks]
        counts = sorted(set(report["n_samples"].values()))
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {100 * report['average']:.1f} | {100 * report['average_acc']:.1f}"
            f" | {'/'.join(map(str, counts))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "reports",
        nargs="+",
        metavar="LABEL=REPORT.json[,REPORT.json...]",
        help="one model's reports (several when its tasks ran in separate runs)",
    )
    parser.add_argument("--name", default="zeroshot", help="results/<name>.json and .md")
    args = parser.parse_args()
    reports = {}
    for item in args.reports:
        label, _, paths = item.partition("=")
        reports[label] = merge([json.loads(Path(path).read_text())["zero_shot"] for path in paths.split(",")])
    text = table(reports)
    print(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"reports": reports}, indent=2))
    (RESULTS / f"{args.name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
