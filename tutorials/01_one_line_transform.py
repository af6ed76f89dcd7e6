"""Tutorial 1: the one-line transform.

Compress every projection of SmolLM2-135M-Instruct with CoSpaDi at a 30 % honest compression ratio,
calibrated on Python's own English documentation (no download), and compare perplexity on held-out text.

    python tutorials/01_one_line_transform.py          # the embedded model, a few minutes on CPU
    python tutorials/01_one_line_transform.py --tiny   # a tiny random model, seconds
"""

from __future__ import annotations

import time

from _setup import parser, setup

from spadi_ao import DictionaryConfig, compression_stats, sparsify_dictionary_
from spadi_ao.pipeline import perplexity


def main() -> None:
    args = parser(__doc__).parse_args()
    run = setup(args.tiny)
    sizes = run.sizes

    def ppl() -> float:
        return perplexity(
            run.model,
            run.tokenizer,
            run.eval_text,
            seq_len=sizes.seq_len,
            max_windows=sizes.eval_windows,
            progress=False,
        ).ppl

    before = ppl()
    # The defaults are the measured best: Procrustes dictionaries refitted by least squares on their supports,
    # each output's error weighted by its loss sensitivity, per-layer ratios from a loss-weighted knapsack over the
    # whole-model budget, and one dictionary for the Linears that read the same input
    # (DictionaryConfig.paper() is the paper's setting). torchao users get the per-layer part
    # with quantize_(model, DictionaryConfig()).
    config = DictionaryConfig(compression_ratio=0.3)
    start = time.perf_counter()
    report = sparsify_dictionary_(run.model, config, calibration=run.calibration)  # <- the one line
    seconds = time.perf_counter() - start
    after = ppl()

    stats = compression_stats(run.model)
    first = report.layers[0]
    print(
        f"compressed {len(report.layers)} Linears in {seconds:.0f} s: {stats['compressed_dense_bytes'] / 2**20:.1f} "
        f"MiB -> {stats['compressed_stored_bytes'] / 2**20:.1f} MiB (honest ratio {report.compression_ratio:.3f})"
    )
    print(
        f"e.g. {first.name}: k={first.k} atoms, s={first.s} non-zeros per output, whitened error "
        f"{first.whitened_error:.3f}"
    )
    print(
        f"perplexity on held-out stdlib text ({sizes.eval_windows} x {sizes.seq_len} tokens): dense {before:.2f} "
        f"-> compressed {after:.2f}"
    )


if __name__ == "__main__":
    main()
