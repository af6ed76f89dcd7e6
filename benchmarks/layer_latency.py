"""Per-layer latency: dense ``F.linear`` vs low-rank vs the dictionary layer at equal honest bytes.

For every layer shape and compression ratio the dictionary gets the largest ``k`` (``k / s = 2``) whose
dictionary, values and bitmask fit ``(1 - CR) * dense`` bytes, and the low-rank baseline the largest
rank in the same bytes (``spadi_ao.budget``). Codes are random: latency does not depend on them.

CPU: a median over interleaved rounds (dense, low-rank, dictionary in turn, so background load hits all
three alike) under ``torch.inference_mode``, after waiting (``--max-wait``) for other processes to idle;
each row records the cores other processes used while it was timed (``bg cores``). ``kernel`` is what
``select_kernel`` picks: on the CPU, decode (M <= 8) reads the packed codes with the native kernel,
larger M expands one small tile of the codes at a time and multiplies it with BLAS (nothing is cached).
The dictionary column is what a compressed layer runs, ``F.linear`` on its ``DictionaryTensor`` weight
(eager CPU inference calls the CPU kernel directly); ``op us`` calls ``spadi_ao::dictionary_linear``
itself, the route ``torch.compile`` and autograd take, and shows its dispatch cost.
With ``--cold`` every variant cycles through enough copies of its weights to overflow the last-level
cache, so each call reads its weights from memory as in a real decode step (``weights`` says how many
copies); without it the same weights are called again and again and stay in cache.
GPU: ``triton.testing.do_bench_cudagraph`` (CUDA-graph replay, no Python launch overhead).

    python benchmarks/layer_latency.py --quick                      # SmolLM2-135M shapes only
    python benchmarks/layer_latency.py --json benchmarks/results/kernels_cpu.json
    python benchmarks/layer_latency.py --cold --json benchmarks/results/kernels_cpu_cold.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from spadi_ao import DictionaryTensor
from spadi_ao.budget import dictionary_budget, dictionary_bytes, low_rank_budget, low_rank_bytes
from spadi_ao.format import pack_codes
from spadi_ao.kernels import select_kernel

SMOLLM2 = [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536)]
LLAMA3_8B = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]
TOKENS = (1, 8, 128, 512)
RATIOS = (0.3, 0.5)
# Targets for the dictionary/dense latency ratio (CPU): decode at M=1 per CR, prefill at M=512.
DECODE_TARGETS = {0.5: 0.6, 0.3: 0.85}
PREFILL_TARGET = 1.0


@dataclass
class Row:
    model: str
    layer: str
    out_features: int
    in_features: int
    cr: float
    tokens: int
    k: int
    s: int
    rank: int
    kernel: str
    dense_bytes: int
    dictionary_bytes: int
    low_rank_bytes: int
    dense_us: float
    low_rank_us: float
    dictionary_us: float
    op_us: float
    background_cores: float  # CPU: cores other processes used while this row was timed
    weight_copies: int  # 1: hot caches; more: cycled through to read the weights from memory

    @property
    def dictionary_ratio(self) -> float:
        return self.dictionary_us / self.dense_us

    @property
    def low_rank_ratio(self) -> float:
        return self.low_rank_us / self.dense_us


def _jiffies() -> tuple[float, float]:
    """(busy CPU ticks of the whole machine, CPU ticks of this process)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(os.times()[:2]) * os.sysconf("SC_CLK_TCK")


def background_cores(work: Callable[[], object]) -> tuple[object, float]:
    """``work()`` and the cores other processes kept busy meanwhile."""
    busy, own, start = *_jiffies(), time.perf_counter()
    result = work()
    busy2, own2, seconds = *_jiffies(), time.perf_counter() - start
    return result, max(0.0, (busy2 - busy) - (own2 - own)) / (seconds * os.sysconf("SC_CLK_TCK"))


def wait_for_quiet_cpu(max_wait_s: float, threshold: float = 0.2) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores; returns the last reading."""
    deadline = time.time() + max_wait_s
    _, load = background_cores(lambda: time.sleep(0.5))
    while load > threshold and time.time() < deadline:
        _, load = background_cores(lambda: time.sleep(2.0))
    return load


def cpu_median_us(fns: dict[str, Callable[[], object]], budget_s: float) -> dict[str, float]:
    """Median per-call time of each function over interleaved rounds of roughly ``budget_s`` in total."""
    per_call = {}
    for name, fn in fns.items():  # warm up (builds caches) and size a block to ~1/10 of the budget share
        fn()
        start = time.perf_counter()
        fn()
        per_call[name] = time.perf_counter() - start
    share = budget_s / len(fns)
    rounds = max(3, min(15, int(share / max(per_call.values()))))
    numbers = {name: max(1, int(share / rounds / max(t, 1e-7))) for name, t in per_call.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(numbers[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / numbers[name])
    return {name: statistics.median(times) * 1e6 for name, times in samples.items()}


def cuda_median_us(fns: dict[str, Callable[[], object]], budget_s: float) -> dict[str, float]:
    from triton.testing import do_bench_cudagraph

    results = {}
    for name, fn in fns.items():
        fn()  # autotune outside the graph capture
        results[name] = do_bench_cudagraph(fn, rep=max(20, int(budget_s * 1000 / len(fns))), return_mode="median") * 1e3
    return results


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache from sysfs (64 MiB if unknown)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1))
    return max(sizes, default=64 * 2**20)


def cycling(items: list) -> Callable[[], object]:
    return itertools.cycle(items).__next__


def random_dictionary(out_features: int, in_features: int, k: int, s: int, dtype: torch.dtype, device: str) -> tuple:
    indices = torch.rand(out_features, k).topk(s, dim=1).indices
    values, bitmask = pack_codes(indices, torch.randn(out_features, s), k)
    dictionary = torch.randn(k, in_features) / in_features**0.5
    return dictionary.to(device, dtype), values.to(device, dtype), bitmask.to(device)


def bench_layer(
    model: str,
    layer: str,
    out_f: int,
    in_f: int,
    cr: float,
    tokens_list,
    dtype,
    device,
    budget_s,
    max_wait_s,
    cold: bool,
) -> list[Row]:
    size = torch.finfo(dtype).bits // 8
    d_budget = dictionary_budget(out_f, in_f, cr, 2.0, size)
    rank = low_rank_budget(out_f, in_f, cr, size).rank
    k, s = d_budget.k, d_budget.s
    copies = max(2, math.ceil(2 * last_level_cache_bytes() / (out_f * in_f * size))) if cold else 1
    dense_weights, low_rank_pairs, packed = [], [], []
    for _ in range(copies):
        dense_weights.append(torch.randn(out_f, in_f, device=device, dtype=dtype) / in_f**0.5)
        low_rank_pairs.append((torch.randn(rank, in_f, device=device, dtype=dtype) / in_f**0.5,
                               torch.randn(out_f, rank, device=device, dtype=dtype) / rank**0.5))  # fmt: skip
        packed.append(random_dictionary(out_f, in_f, k, s, dtype, device))
    layer_weights = [DictionaryTensor(dictionary, values, bitmask, dtype) for dictionary, values, bitmask in packed]
    next_dense, next_pair, next_layer, next_packed = map(
        cycling, (dense_weights, low_rank_pairs, layer_weights, packed)
    )
    measure = cuda_median_us if device == "cuda" else cpu_median_us
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, in_f, device=device, dtype=dtype)
        kernel = select_kernel(x.device, dtype, tokens)
        fns = {
            "dense": lambda: F.linear(x, next_dense()),
            "low_rank": lambda: (lambda down, up: F.linear(F.linear(x, down), up))(*next_pair()),
            "dictionary": lambda: F.linear(x, next_layer()),
            "op": lambda: (lambda d, v, b: torch.ops.spadi_ao.dictionary_linear(x, d, None, v, None, b, None))(
                *next_packed()
            ),
        }
        background = 0.0
        if device == "cpu":
            wait_for_quiet_cpu(max_wait_s)
            times, background = background_cores(lambda: measure(fns, budget_s))
        else:
            times = measure(fns, budget_s)
        rows.append(
            Row(
                model, layer, out_f, in_f, cr, tokens, k, s, rank, kernel,
                out_f * in_f * size, dictionary_bytes(out_f, in_f, k, s, size), low_rank_bytes(out_f, in_f, rank, size),
                times["dense"], times["low_rank"], times["dictionary"], times["op"], round(background, 2), copies,
            )
        )  # fmt: skip
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (
    "| model | layer | out x in | CR | M | k / s | rank | kernel | dense us | low-rank us | dictionary us "
    "| dict/dense | low-rank/dense | op us | bg cores | weights |"
)

SEPARATOR = "|" + "---|" * (HEADER.count("|") - 1)


def format_row(r: Row) -> str:
    return (
        f"| {r.model} | {r.layer} | {r.out_features}x{r.in_features} | {r.cr} | {r.tokens} | {r.k} / {r.s} | {r.rank} "
        f"| {r.kernel} | {r.dense_us:.1f} | {r.low_rank_us:.1f} | {r.dictionary_us:.1f} | {r.dictionary_ratio:.2f} "
        f"| {r.low_rank_ratio:.2f} | {r.op_us:.1f} | {r.background_cores:.2f} "
        f"| {'hot' if r.weight_copies == 1 else f'cold x{r.weight_copies}'} |"
    )


def target_summary(rows: list[Row]) -> list[str]:
    """One line per target: how many layer shapes meet it, and the geometric-mean ratio."""
    lines = []
    checks = [
        (f"decode M=1, CR {cr}", lambda r, cr=cr: r.tokens == 1 and r.cr == cr, bound)
        for cr, bound in DECODE_TARGETS.items()
    ]
    checks.append(("prefill M=512, all CR", lambda r: r.tokens == 512, PREFILL_TARGET))
    for label, select, bound in checks:
        ratios = [r.dictionary_ratio for r in rows if select(r)]
        if ratios:
            met = sum(ratio <= bound for ratio in ratios)
            geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            lines.append(
                f"- {label}: dictionary/dense <= {bound}: met for {met}/{len(ratios)} shapes "
                f"(geomean {geomean:.2f}, worst {max(ratios):.2f})"
            )
    return lines


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2-135M shapes only")
    parser.add_argument("--json", type=Path, default=None, help="default benchmarks/results/kernels_<device>.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per (shape, CR, M)")
    parser.add_argument("--max-wait", type=float, default=20.0, help="CPU: seconds to wait for other processes to idle")
    parser.add_argument(
        "--cold", action="store_true", help="cycle through weight copies that overflow the last-level cache"
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="token counts M to time")
    args = parser.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    path = args.json or Path(__file__).parent / "results" / f"kernels_{device}.json"
    models = [("SmolLM2-135M", SMOLLM2)] + ([] if args.quick else [("Llama-3-8B", LLAMA3_8B)])

    print(HEADER + "\n" + SEPARATOR)
    rows: list[Row] = []
    started = time.time()
    with torch.inference_mode():
        for model, shapes in models:
            for layer, out_f, in_f in shapes:
                for cr in RATIOS:
                    # Big layers get less timing: a 14336x4096 GEMM at M=512 takes ~0.4 s on 2 cores.
                    budget = args.budget if out_f * in_f <= 2**22 or device == "cuda" else args.budget / 2
                    rows += bench_layer(
                        model, layer, out_f, in_f, cr, args.tokens, dtype, device, budget, args.max_wait, args.cold
                    )
    summary = target_summary(rows)
    print("\n".join(["", *summary]))

    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "seconds": round(time.time() - started, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],  # other processes on the cores skew CPU timings
        "command": " ".join(sys.argv),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [asdict(r) | {"dictionary_ratio": r.dictionary_ratio, "low_rank_ratio": r.low_rank_ratio} for r in rows]
    path.write_text(json.dumps({"meta": meta, "targets": summary, "rows": records}, indent=1))
    table = [HEADER, SEPARATOR, *map(format_row, rows)]
    markdown = [
        f"# Kernel latency ({device}, {dtype}, {meta['threads']} threads, {'cold' if args.cold else 'hot'} weights)",
        "",
        f"`{meta}`",
        "",
        *table,
        "",
        *summary,
    ]
    path.with_suffix(".md").write_text("\n".join(markdown) + "\n")
    print(f"\nwrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
