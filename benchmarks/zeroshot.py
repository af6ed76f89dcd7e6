"""Zero-shot accuracy table from ``spadi-ao eval --tasks ... --output REPORT.json`` reports.

Each evaluation is its own CLI run (one model per run keeps every run short); this script puts their
lm-eval numbers side by side: per task the metric papers report (``acc_norm`` where lm-eval defines it,
else ``acc``), the average of those, and the average of plain ``acc``.

    python benchmarks/zeroshot.py dense=benchmarks/results/zeroshot-dense.json \\
        cospadi=benchmarks/results/zeroshot-cospadi.json svd-llm=benchmarks/results/zeroshot-svd-llm.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, environment, write_json


def table(reports: dict[str, dict]) -> str:
    first = next(iter(reports.values()))
    tasks = list(first["reported"])
    header = ["model", *(f"{t} ({first['reported'][t]})" for t in tasks), "average", "mean acc", "docs per task"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, report in reports.items():
        if report["reported"] != first["reported"]:
            raise SystemExit(f"{label}: tasks or metrics differ from the first report's")
        cells = [f"{100 * report['results'][t][m + ',none']:.1f}" for t, m in report["reported"].items()]
        counts = sorted(set(report["n_samples"].values()))
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {100 * report['average']:.1f} | {100 * report['average_acc']:.1f}"
            f" | {'/'.join(map(str, counts))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", metavar="LABEL=REPORT.json")
    parser.add_argument("--name", default="zeroshot", help="results/<name>.json and .md")
    args = parser.parse_args()
    reports = {}
    for item in args.reports:
        label, _, path = item.partition("=")
        reports[label] = json.loads(Path(path).read_text())["zero_shot"]
    text = table(reports)
    print(text)
    write_json(RESULTS / f"{args.name}.json", {"environment": environment(), "reports": reports})
    (RESULTS / f"{args.name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
