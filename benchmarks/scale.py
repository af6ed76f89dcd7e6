"""Scale: host memory of sequential compression, 2-rank solve speed-up, kill-and-resume.

Every measurement runs in a fresh child process, so its peak RSS (``ru_maxrss``) is that run's alone.
The models are random-init Llama architectures built without a second copy of the weights (on the
meta device, then materialised and filled in place), calibrated on random tokens: memory and time do
not depend on what the weights say.

    python benchmarks/scale.py                                   # rss, speedup, resume: ~1B model (16 and 32 layers)
    python benchmarks/scale.py --parts rss --layers 16 32
    python benchmarks/scale.py --quick                           # small shapes, a smoke test (< 1 min)
    python benchmarks/scale.py --parts layers --name scale-layers    # per-layer solve time and memory

* ``rss``: peak RSS of ``sparsify_dictionary_(sequential=True)`` vs the model's fp32 weight bytes
  (target < 1.3x), and its growth from L to 2L layers vs the added weight bytes;
* ``speedup``: the solve phase (wall time from a block's first solve to the end of the exchange, summed
  over blocks) with 1 process x 1 thread vs 2 gloo processes x 1 thread each (``torch.distributed.run``),
  outputs compared byte for byte (target >= 1.7x);
* ``layers``: per layer shape (SmolLM2, Llama-3-8B), one thread: Gram accumulation over 8 x 256 tokens
  and whitening, then whitening + solve per solver, each with its time and peak RSS;
* ``resume``: a run SIGKILLed at a random layer, restarted and killed again at another, then finished,
  against an uninterrupted run, byte for byte;
* ``spill``: the same run with block inputs kept in memory and spilled to memory-mapped files (as on a
  machine with no memory to spare: the child reports none available), peak RSS and time of each,
  outputs compared byte for byte. ``--shape quick --layers 4 --samples 256 --seq-len 512`` makes the
  inputs (128 MiB a block) the largest thing in memory.

Writes benchmarks/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "global": {"allocation": "knapsack", "grouping": "inputs"},
    "uniform": {"allocation": "uniform", "grouping": None},
}
"""``global``: the knapsack over the whole model and in-block shared dictionaries (a first pass, then the
compress pass); ``uniform``: every Linear at CR 0.3 on its own dictionary (the compress pass alone)."""
SHAPES = {
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000
    ),
    "quick": dict(
        hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2, vocab_size=4000
    ),
}


# ------------------------------------------------------------------------------------------ child


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_model(shape: str, layers: int, seed: int = 0):
    """A random-init LlamaForCausalLM holding one copy of its weights (meta, then filled in place)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[shape], num_hidden_layers=layers, tie_word_embeddings=True, max_position_embeddings=1024
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    _rotary_fix(model)
    return model.eval()


def _rotary_fix(model) -> None:
    """``to_empty`` leaves non-persistent buffers (the rotary frequencies) uninitialised: recompute them."""

    rotary = model.model.rotary_emb
    inv_freq, _ = type(rotary).compute_default_rope_parameters(rotary.config)
    rotary.inv_freq.copy_(inv_freq)
    rotary.original_inv_freq.copy_(inv_freq)


def _state_digest(model) -> str:
    import torch

    from spadi_ao.serialization import flatten_state_dict

    tensors, _ = flatten_state_dict(model.state_dict())
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class SolveClock:
    """Wall time of the solve phase: from each block's first solve on this rank to the end of the exchange
    (where the ranks meet), summed over blocks.

    The start is marked where each solve reads its output weights (``solve_weights``), not around
    ``compress_weight``: a wrapper's arguments live as long as the call, and a solve is handed its Gram to
    factor in place and free before the solver runs (512 MiB at the 1B shape's down_proj), so wrapping it
    would hold that Gram through the solve and measure a peak the library does not have."""

    def __init__(self) -> None:
        import spadi_ao.api
        import spadi_ao.sequential

        self.seconds = 0.0
        self._start: float | None = None
        weights, exchange = spadi_ao.api.solve_weights, spadi_ao.sequential.exchange_layers

        def timed_weights(*args, **kwargs):
            self._start = self._start or time.perf_counter()
            return weights(*args, **kwargs)

        def timed_exchange(*args, **kwargs):
            result = exchange(*args, **kwargs)
            if self._start is not None:
                self.seconds += time.perf_counter() - self._start
                self._start = None
            return result

        spadi_ao.api.solve_weights = timed_weights
        spadi_ao.sequential.exchange_layers = timed_exchange


class FirstPassClock:
    """The knapsack's first pass: wall time of the loss-sensitivity backward and of the whole pass (sensitivity
    plus the per-unit tables, up to the knapsack), the survey's table phase (first table job on this rank to
    the table exchange, summed over blocks, as :class:`SolveClock`), and the peak RSS when each ended."""

    def __init__(self) -> None:
        import spadi_ao.api
        import spadi_ao.sequential

        self.seconds = self.sensitivity_seconds = self.table_seconds = 0.0
        self.peak_rss_after_sensitivity = self.peak_rss_after = 0
        self._start: float | None = None
        survey, sensitivity = spadi_ao.sequential._Blockwise.survey, spadi_ao.sequential.blockwise_sensitivity
        tabulate, exchange = spadi_ao.api.tabulate_unit, spadi_ao.sequential.exchange_tables

        def timed_survey(*args, **kwargs):
            start = time.perf_counter()
            result = survey(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.peak_rss_after = _rss_bytes()
            return result

        def timed_sensitivity(*args, **kwargs):
            start = time.perf_counter()
            result = sensitivity(*args, **kwargs)
            self.sensitivity_seconds += time.perf_counter() - start
            self.peak_rss_after_sensitivity = _rss_bytes()
            return result

        def timed_tabulate(*args, **kwargs):
            self._start = self._start or time.perf_counter()
            return tabulate(*args, **kwargs)

        def timed_exchange(*args, **kwargs):
            result = exchange(*args, **kwargs)
            if self._start is not None:
                self.table_seconds += time.perf_counter() - self._start
                self._start = None
            return result

        spadi_ao.sequential._Blockwise.survey, spadi_ao.sequential.blockwise_sensitivity = (
            timed_survey,
            timed_sensitivity,
        )
        spadi_ao.api.tabulate_unit, spadi_ao.sequential.exchange_tables = timed_tabulate, timed_exchange


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if os.environ.get("WORLD_SIZE"):
        torch.distributed.init_process_group("gloo")
    from spadi_ao import DictionaryConfig, sparsify_dictionary_

    if args.force_spill:
        import spadi_ao.block_inputs

        spadi_ao.block_inputs.available_memory_bytes = lambda: 0
    baseline = _current_rss_bytes()
    model = build_model(args.shape, args.layers)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    built = _current_rss_bytes()
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=generator) for _ in range(args.samples)
    ]
    config = DictionaryConfig(compression_ratio=0.3, solver="fast", fast_steps=0, **SETTINGS[args.setting])
    clock = SolveClock()
    first_pass = FirstPassClock()
    start = time.perf_counter()
    report = sparsify_dictionary_(
        model,
        config,
        calibration=batches,
        sequential=True,
        propagate=args.propagate,
        checkpoint_dir=args.checkpoint_dir,
        progress=False,
    )
    seconds = time.perf_counter() - start
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    result = {
        "layers": args.layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes,
        "baseline_rss": baseline,
        "rss_after_build": built,
        "peak_rss": _rss_bytes(),
        "seconds": seconds,
        "solve_seconds": clock.seconds,
        "first_pass_seconds": first_pass.seconds,
        "sensitivity_seconds": first_pass.sensitivity_seconds,
        "table_seconds": first_pass.table_seconds,
        "peak_rss_after_sensitivity": first_pass.peak_rss_after_sensitivity,
        "peak_rss_after_first_pass": first_pass.peak_rss_after,
        "setting": args.setting,
        "propagate": args.propagate,
        "threads": args.threads,
        "compression_ratio": report.compression_ratio,
        "digest": _state_digest(model) if args.digest else None,
        "rank": rank,
    }
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


LAYER_SHAPES = {
    "SmolLM2 q/o": (576, 576),
    "SmolLM2 k/v": (192, 576),
    "SmolLM2 gate/up": (1536, 576),
    "SmolLM2 down": (576, 1536),
    "Llama-3-8B q/o": (4096, 4096),
    "Llama-3-8B k/v": (1024, 4096),
    "Llama-3-8B gate/up": (14336, 4096),
    "Llama-3-8B down": (4096, 14336),
}
WHITENING = "Gram + whitening"
SOLVERS = {
    "K-SVD one-shot (iterations=0)": dict(solver="ksvd", iterations=0, atoms_per_step=8),
    "fast, 0 steps": dict(solver="fast", fast_steps=0),
    "fast, 8 steps": dict(solver="fast"),
    "K-SVD, 1 iteration": dict(solver="ksvd", iterations=1, atoms_per_step=8),
}
GRAM_TOKENS = (8, 256)


def _gram_and_whitening(in_features: int, generator) -> dict:
    """Accumulate a Gram over 8 x 256 random tokens as calibration does, then whiten it as sequential mode does."""
    import torch

    from spadi_ao.calibration import GramCollector
    from spadi_ao.layer import whitening_for

    probe = torch.nn.Linear(in_features, 1, bias=False)
    batches = [torch.randn(1, GRAM_TOKENS[1], in_features, generator=generator) for _ in range(GRAM_TOKENS[0])]
    before = _current_rss_bytes()
    start = time.perf_counter()
    with GramCollector({"probe": probe}) as collector, torch.no_grad():
        for batch in batches:
            probe(batch)
    gram_seconds = time.perf_counter() - start
    start = time.perf_counter()
    whitening_for(collector.take("probe"), in_features, 1e-2, 0.0, torch.device("cpu"), overwrite=True)
    return {
        "gram_seconds": gram_seconds,
        "seconds": time.perf_counter() - start,
        "rss_before_solve": before,
        "k": None,
        "s": None,
    }


def _solve(out_features: int, in_features: int, solver: str, generator) -> dict:
    """Whitening + one solver on a random weight and a Gram with a few dominant directions over a spread of energies."""
    import torch

    from spadi_ao import DictionaryConfig
    from spadi_ao.layer import compress_weight

    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    directions = torch.randn(in_features, 64, generator=generator, dtype=torch.float64)
    gram = (directions @ directions.T).div_(64)  # built in place: the peak below is the solve's, not the set-up's
    del directions
    gram.diagonal().add_(torch.rand(in_features, generator=generator, dtype=torch.float64) + 0.1)
    before = _current_rss_bytes()
    config = DictionaryConfig(compression_ratio=0.3, gram_shrinkage=0.0, **SOLVERS[solver])
    start = time.perf_counter()
    _, report = compress_weight(solver, weight, gram, config, calibration_tokens=4096, overwrite_gram=True)
    return {"seconds": time.perf_counter() - start, "rss_before_solve": before, "k": report.k, "s": report.s}


def layer_child(args: argparse.Namespace) -> None:
    """One layer shape and one step (Gram + whitening, or whitening + a solver) in this fresh process."""
    import torch

    torch.set_num_threads(args.threads)
    out_features, in_features = LAYER_SHAPES[args.layer_shape]
    generator = torch.Generator().manual_seed(0)
    if args.solver_name == WHITENING:
        result = _gram_and_whitening(in_features, generator)
    else:
        result = _solve(out_features, in_features, args.solver_name, generator)
    result.update(
        shape=args.layer_shape,
        out=out_features,
        solver=args.solver_name,
        peak_rss=_rss_bytes(),
        threads=args.threads,
        weight_bytes=out_features * in_features * 4,
        gram_bytes=in_features**2 * 8,
        **{"in": in_features},
    )
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------- parent


def part_layers(args: argparse.Namespace) -> list[dict]:
    rows = []
    for shape in args.layer_shapes:
        for solver in [WHITENING, *args.solvers]:
            row = _run([__file__, "--child", "--layer-shape", shape, "--solver-name", solver, "--threads", "1"])
            rows.append(row)
            gram = f"Gram {row['gram_seconds']:.1f}s, " if "gram_seconds" in row else ""
            print(
                f"layer {shape} ({row['out']}x{row['in']}, k={row['k']}, s={row['s']}), {solver}: "
                f"{gram}{row['seconds']:.1f}s, peak RSS {row['peak_rss'] / 2**30:.2f} GiB "
                f"(+{(row['peak_rss'] - row['rss_before_solve']) / 2**30:.2f} GiB during it)",
                flush=True,
            )
    return rows


def _child_command(
    args: argparse.Namespace,
    layers: int,
    threads: int | None = None,
    checkpoint_dir: str | None = None,
    digest: bool = False,
    force_spill: bool = False,
) -> list[str]:
    command = [
        __file__,
        "--child",
        "--shape",
        args.shape,
        "--layers",
        str(layers),
        "--threads",
        str(threads or args.threads),
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--setting",
        args.setting,
        "--propagate",
        args.propagate,
    ]
    if checkpoint_dir:
        command += ["--checkpoint-dir", checkpoint_dir]
    return command + (["--digest"] if digest else []) + (["--force-spill"] if force_spill else [])


def _run(command: list[str], launcher: list[str] | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": command[command.index("--threads") + 1]}
    completed = subprocess.run((launcher or [sys.executable]) + command, capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"child failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def part_rss(args: argparse.Namespace) -> dict:
    runs = []
    for layers in args.layers:
        result = _run(_child_command(args, layers))
        result["peak_over_weights"] = result["peak_rss"] / result["weight_bytes"]
        runs.append(result)
        print(
            f"rss: {layers} layers, {result['parameters'] / 1e9:.2f}B params, weights "
            f"{result['weight_bytes'] / 2**30:.2f} GiB, peak RSS {result['peak_rss'] / 2**30:.2f} GiB "
            f"({result['peak_over_weights']:.2f}x), {result['seconds']:.0f}s; first pass "
            f"{result['first_pass_seconds']:.0f}s (sensitivity {result['sensitivity_seconds']:.0f}s), peak RSS by its "
            f"end {result['peak_rss_after_first_pass'] / 2**30:.2f} GiB (after the sensitivity "
            f"{result['peak_rss_after_sensitivity'] / 2**30:.2f} GiB)",
            flush=True,
        )
    growth = None
    if len(runs) >= 2:
        growth = {
            "added_weight_bytes": runs[-1]["weight_bytes"] - runs[0]["weight_bytes"],
            "added_peak_rss": runs[-1]["peak_rss"] - runs[0]["peak_rss"],
        }
    return {"runs": runs, "growth": growth}


def part_speedup(args: argparse.Namespace) -> dict:
    layers = args.speedup_layers
    single = _run(_child_command(args, layers, threads=1, digest=True))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533"]
    double = _run(_child_command(args, layers, threads=1, digest=True), launcher=launcher)
    result = {
        "layers": layers,
        "one_rank_solve_seconds": single["solve_seconds"],
        "two_ranks_solve_seconds": double["solve_seconds"],
        "speedup": single["solve_seconds"] / double["solve_seconds"],
        "one_rank_table_seconds": single["table_seconds"],
        "two_ranks_table_seconds": double["table_seconds"],
        "one_rank_first_pass_seconds": single["first_pass_seconds"],
        "two_ranks_first_pass_seconds": double["first_pass_seconds"],
        "one_rank_total_seconds": single["seconds"],
        "two_ranks_total_seconds": double["seconds"],
        "identical": single["digest"] == double["digest"],
    }
    print(
        f"speedup: solve phase 1 rank {single['solve_seconds']:.1f}s, 2 ranks {double['solve_seconds']:.1f}s -> "
        f"{result['speedup']:.2f}x (whole run {single['seconds']:.1f}s vs {double['seconds']:.1f}s), identical "
        f"output: {result['identical']}; first pass {single['first_pass_seconds']:.1f}s vs "
        f"{double['first_pass_seconds']:.1f}s, its table phase {single['table_seconds']:.1f}s vs "
        f"{double['table_seconds']:.1f}s",
        flush=True,
    )
    return result


def part_spill(args: argparse.Namespace) -> dict:
    layers = args.layers[0]
    kept = _run(_child_command(args, layers, digest=True))
    spilled = _run(_child_command(args, layers, digest=True, force_spill=True))
    result = {
        "layers": layers,
        "in_memory_peak_rss": kept["peak_rss"],
        "spilled_peak_rss": spilled["peak_rss"],
        "in_memory_seconds": kept["seconds"],
        "spilled_seconds": spilled["seconds"],
        "identical": kept["digest"] == spilled["digest"],
        "input_bytes_per_block": args.samples * args.seq_len * SHAPES[args.shape]["hidden_size"] * 4,
    }
    print(
        f"spill: peak RSS {kept['peak_rss'] / 2**30:.2f} GiB in memory, {spilled['peak_rss'] / 2**30:.2f} GiB spilled; "
        f"{kept['seconds']:.1f} s vs {spilled['seconds']:.1f} s; identical output: {result['identical']}",
        flush=True,
    )
    return result


def _killed_run(command: list[str], directory: Path, kill_after_layers: int) -> int:
    """Start a run, SIGKILL it once the checkpoint holds ``kill_after_layers`` more entries (first-pass tables and
    compressed layers); returns the entries done."""
    manifest = directory / "manifest.json"

    def done() -> int:
        try:
            state = json.loads(manifest.read_text())
            return len(state["layers"]) + len(state["tables"])
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    start_count = done()
    env = {**os.environ, "OMP_NUM_THREADS": command[command.index("--threads") + 1]}
    process = subprocess.Popen(
        [sys.executable] + command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    while process.poll() is None and done() < start_count + kill_after_layers:
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return done()


def part_resume(args: argparse.Namespace) -> dict:
    layers = args.resume_layers
    total = layers * (7 + (4 if args.setting == "global" else 0))  # Linears, plus qkv/o/gate_up/down tables a block
    reference = _run(_child_command(args, layers, digest=True))
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as directory:
        command = _child_command(args, layers, checkpoint_dir=directory, digest=True)
        kills = []
        for _ in range(2):
            kills.append(_killed_run(command, Path(directory), rng.randint(1, max(1, total // 3))))
        finished = _run(command)
    result = {
        "layers": layers,
        "linears": total,
        "layers_done_at_kills": kills,
        "identical": finished["digest"] == reference["digest"],
    }
    print(
        f"resume: killed with {kills} of {total} checkpoint entries (first-pass tables and Linears) done; final "
        f"model identical to uninterrupted: {result['identical']}",
        flush=True,
    )
    return result


MALLOC_NOTE = ", glibc MALLOC_MMAP_THRESHOLD_={} (freed weights go back to the system at once)"


def write(results: dict, args: argparse.Namespace) -> None:
    malloc = MALLOC_NOTE.format(os.environ["MALLOC_MMAP_THRESHOLD_"]) if "MALLOC_MMAP_THRESHOLD_" in os.environ else ""
    lines = [
        f"Model shape `{args.shape}` ({SHAPES[args.shape]}), calibration {args.samples} x {args.seq_len} random "
        f"tokens, CoSpaDi CR 0.3, solver='fast', fast_steps=0, {args.setting} allocation, sequential=True, "
        f"propagate={args.propagate!r}, "
        f"{args.threads} thread(s) per process (rss, resume){malloc}.",
        "",
    ]
    if "rss" in results:
        lines += [
            "| layers | parameters | fp32 weights GiB | RSS after imports GiB | peak RSS GiB | peak / weights | "
            "seconds | "
            "first pass s (sensitivity s) | peak RSS by the end of the first pass GiB (of the sensitivity) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for run in results["rss"]["runs"]:
            first_pass = (  # the uniform setting has none
                f"{run['first_pass_seconds']:.0f} ({run['sensitivity_seconds']:.0f}) | "
                f"{run['peak_rss_after_first_pass'] / 2**30:.2f} ({run['peak_rss_after_sensitivity'] / 2**30:.2f})"
                if run["first_pass_seconds"]
                else "- | -"
            )
            lines.append(
                f"| {run['layers']} | {run['parameters'] / 1e9:.3f}B | {run['weight_bytes'] / 2**30:.2f} | "
                f"{run['baseline_rss'] / 2**30:.2f} | {run['peak_rss'] / 2**30:.2f} | {run['peak_over_weights']:.2f} "
                f"| {run['seconds']:.0f} | {first_pass} |"
            )
        growth = results["rss"]["growth"]
        if growth:
            lines += [
                "",
                f"Doubling the layers added {growth['added_weight_bytes'] / 2**30:.2f} GiB of weights and "
                f"{growth['added_peak_rss'] / 2**30:.2f} GiB of peak RSS.",
            ]
    if "speedup" in results:
        r = results["speedup"]
        lines += [
            "",
            f"Solve phase ({r['layers']} layers): 1 rank x 1 thread {r['one_rank_solve_seconds']:.1f} s, 2 ranks x 1 "
            f"thread {r['two_ranks_solve_seconds']:.1f} s: {r['speedup']:.2f}x (whole run "
            f"{r['one_rank_total_seconds']:.1f} s vs {r['two_ranks_total_seconds']:.1f} s); identical output: "
            f"{r['identical']}. First pass {r['one_rank_first_pass_seconds']:.1f} s vs "
            f"{r['two_ranks_first_pass_seconds']:.1f} s, its table phase {r['one_rank_table_seconds']:.1f} s vs "
            f"{r['two_ranks_table_seconds']:.1f} s.",
        ]
    if "resume" in results:
        r = results["resume"]
        lines += [
            "",
            f"Kill and resume ({r['linears']} checkpoint entries: first-pass tables and Linears): killed twice with "
            f"{r['layers_done_at_kills']} entries checkpointed; "
            f"final model bit-identical to an uninterrupted run: {r['identical']}.",
        ]
    if "spill" in results:
        r = results["spill"]
        lines += [
            "",
            f"Block inputs ({r['layers']} layers, {r['input_bytes_per_block'] / 2**20:.0f} MiB a block): peak RSS "
            f"{r['in_memory_peak_rss'] / 2**30:.2f} GiB kept in memory, {r['spilled_peak_rss'] / 2**30:.2f} GiB "
            f"spilled to memory-mapped files; {r['in_memory_seconds']:.1f} s vs {r['spilled_seconds']:.1f} s; "
            f"identical output: {r['identical']}.",
        ]
    if "layers" in results:
        lines += [
            "",
            f"Per layer, CR 0.3, 1 thread, a fresh process per row (peak RSS of the whole process; 'added' is what the "
            f"step added to the weight and Gram already in memory). '{WHITENING}': Gram accumulation over "
            f"{GRAM_TOKENS[0]} x {GRAM_TOKENS[1]} tokens, then the in-place whitening; the solver rows include "
            "whitening.",
            "",
            "| layer | out x in | k / s | step | Gram s | seconds | Gram MiB | peak RSS GiB | added GiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["layers"]:
            sizes = f"{r['k']} / {r['s']}" if r["k"] is not None else "-"
            gram = f"{r['gram_seconds']:.2f}" if "gram_seconds" in r else "-"
            lines.append(
                f"| {r['shape']} | {r['out']}x{r['in']} | {sizes} | {r['solver']} | {gram} | {r['seconds']:.2f} | "
                f"{r['gram_bytes'] / 2**20:.0f} | {r['peak_rss'] / 2**30:.2f} | "
                f"{(r['peak_rss'] - r['rss_before_solve']) / 2**30:.2f} |"
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    malloc = (
        {"MALLOC_MMAP_THRESHOLD_": os.environ["MALLOC_MMAP_THRESHOLD_"]}
        if "MALLOC_MMAP_THRESHOLD_" in os.environ
        else {}
    )
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"command": " ".join(["python", *sys.argv]), "environment": malloc, **results}, indent=1)
    )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["rss", "speedup", "resume"],
        choices=["rss", "speedup", "resume", "layers", "spill"],
    )
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 32], help="rss: decoder layers of each run")
    parser.add_argument("--speedup-layers", type=int, default=2)
    parser.add_argument("--resume-layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke test")
    parser.add_argument("--name", default="scale")
    parser.add_argument("--layer-shapes", nargs="+", default=list(LAYER_SHAPES), choices=list(LAYER_SHAPES))
    parser.add_argument(
        "--solvers",
        nargs="+",
        default=list(SOLVERS)[:3],
        choices=list(SOLVERS),
        help="layers: solvers timed after the Gram + whitening row (default: all but K-SVD, 1 iteration)",
    )
    parser.add_argument(
        "--setting",
        default="global",
        choices=sorted(SETTINGS),
        help="global: knapsack + grouping='inputs' (default); uniform",
    )
    parser.add_argument(
        "--propagate",
        default="compressed",
        choices=["compressed", "corrected", "blended"],
        help="what later blocks are calibrated on (sparsify_dictionary_'s propagate=)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="threads per process of the rss and resume parts (speedup: 1, layers: 1)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layer-shape", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--solver-name", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--digest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--force-spill", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.layer_shape:
            layer_child(args)
            return
        args.layers = args.layers[0]
        child(args)
        return
    if args.quick:
        args.shape, args.layers, args.samples, args.seq_len, args.name = "quick", [2, 4], 4, 64, "scale-quick"
        args.threads, args.layer_shapes, args.solvers = 1, ["SmolLM2 q/o", "SmolLM2 down"], ["fast, 0 steps"]
    results = {}
    for part in args.parts:
        parts = {
            "rss": part_rss,
            "speedup": part_speedup,
            "resume": part_resume,
            "layers": part_layers,
            "spill": part_spill,
        }
        results[part] = parts[part](args)
    write(results, args)


if __name__ == "__main__":
    main()
