"""The two entry points with the defaults on SmolLM2-135M at CR 0.3: ``sparsify_dictionary_(model,
DictionaryConfig(), calibration=...)`` (what ``spadi-ao compress`` runs) and torchao's ``quantize_(model,
DictionaryConfig())`` after ``spadi_ao.prepare_calibration`` (per layer: no knapsack, no shared dictionaries).

    spadi-ao compress --output runs/default                     # the CLI with its defaults
    python benchmarks/entry_points.py --parts sparsify --cli-output runs/default
    python benchmarks/entry_points.py --parts quantize

Both parts use the CLI's calibration (32 x 512 tokens of the stdlib corpus, its seed) and its perplexity
(held-out stdlib text, first 16 x 512 windows). ``--cli-output`` checks that ``sparsify_dictionary_`` gives
the CLI's saved model bit for bit. Writes benchmarks/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import RESULTS, environment, fresh_copy, load_default, write_json
from torchao.quantization import quantize_

from spadi_ao import DictionaryConfig, prepare_calibration, sparsify_dictionary_
from spadi_ao.calibration import run_calibration
from spadi_ao.cli import _calibration_batches, _text, build_parser
from spadi_ao.pipeline.evaluate import perplexity
from spadi_ao.serialization import load_compressed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["sparsify", "quantize"], default=["sparsify", "quantize"])
    parser.add_argument(
        "--cli-output", default=None, help="a `spadi-ao compress` output folder to compare with, bit for bit"
    )
    parser.add_argument("--name", default="entry-points")
    return parser.parse_args()


def _same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    state, expected = model.state_dict(), reference.state_dict()
    if state.keys() != expected.keys():
        return False
    for key, value in expected.items():
        actual = state[key]
        if type(actual) is not type(value):
            return False
        if hasattr(value, "__tensor_flatten__"):
            names = value.__tensor_flatten__()[0]
            if actual.__tensor_flatten__()[0] != names or not all(
                torch.equal(getattr(actual, n), getattr(value, n)) for n in names
            ):
                return False
        elif not torch.equal(actual, value):
            return False
    return True


def main() -> None:
    args = parse_args()
    cli = build_parser().parse_args(["compress"])  # the CLI's defaults: calibration, seed, evaluation windows
    model, tokenizer = load_default()
    batches = _calibration_batches(cli, tokenizer)
    eval_text = _text(cli.eval_text, 1)

    def ppl(candidate) -> float:
        return perplexity(
            candidate,
            tokenizer,
            eval_text,
            seq_len=cli.seq_len,
            batch_size=cli.batch_size,
            max_windows=cli.eval_windows,
            progress=False,
        ).ppl

    rows = []
    if "sparsify" in args.parts:
        compressed = fresh_copy(model)
        start = time.perf_counter()
        report = sparsify_dictionary_(compressed, DictionaryConfig(), calibration=batches, progress=False)
        seconds = time.perf_counter() - start
        row = {
            "entry point": "sparsify_dictionary_(model, DictionaryConfig(), calibration=batches)",
            "seconds": seconds,
            "compression_ratio": report.compression_ratio,
            "ppl": ppl(compressed),
        }
        if args.cli_output:
            row["same_as_cli"] = _same_weights(compressed, load_compressed(args.cli_output)[0])
        rows.append(row)
        del compressed
    if "quantize" in args.parts:
        compressed = fresh_copy(model)
        start = time.perf_counter()
        prepare_calibration(compressed)
        run_calibration(compressed, batches, progress=False)
        calibrated = time.perf_counter()
        quantize_(compressed, DictionaryConfig())
        seconds = time.perf_counter() - start
        stored = sum(
            m.weight.stored_bytes() for m in compressed.modules() if hasattr(getattr(m, "weight", None), "stored_bytes")
        )
        dense = sum(
            m.weight.shape[0] * m.weight.shape[1] * 4
            for m in compressed.modules()
            if hasattr(getattr(m, "weight", None), "stored_bytes")
        )
        rows.append(
            {
                "entry point": "prepare_calibration + calibration + quantize_(model, DictionaryConfig())",
                "seconds": seconds,
                "calibration_seconds": calibrated - start,
                "compression_ratio": 1 - stored / dense,
                "ppl": ppl(compressed),
            }
        )
        del compressed
    payload = {
        "model": "SmolLM2-135M-Instruct (float32)",
        "calibration": f"{cli.n_samples} x {cli.seq_len} stdlib tokens",
        "evaluation": f"stdlib held-out, first {cli.eval_windows} x {cli.seq_len} windows",
        "dense_ppl": ppl(model),
        "rows": rows,
        "environment": environment(),
    }
    write_json(RESULTS / f"{args.name}.json", payload)
    lines = [
        f"SmolLM2-135M-Instruct, CR 0.3, {payload['calibration']}; perplexity on {payload['evaluation']} (dense "
        f"{payload['dense_ppl']:.2f}).",
        "",
        "| entry point | seconds | achieved CR | PPL | same as CLI |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['entry point']}` | {row['seconds']:.0f} | {row['compression_ratio']:.4f} | {row['ppl']:.2f} "
            f"| {row.get('same_as_cli', '-')} |"
        )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
