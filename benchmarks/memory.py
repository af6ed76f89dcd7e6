"""Run-time memory of SmolLM2-135M, dense vs CoSpaDi: what a model holds after loading, a prefill and decoding.

Each model is first saved (the dense one with ``save_pretrained``, the compressed ones with
``save_compressed``), then loaded and run in a fresh Python process of its own, so that its resident set
size (RSS) is its own. In that process it records, after loading, after one prefill of ``--prompt`` tokens
with a KV cache, and after ``--decode`` greedy decode steps on that cache:

* ``weight_bytes``: the bytes of every distinct tensor storage reachable from Python objects, except the
  KV cache, the last logits and the token ids: the weights plus anything a kernel keeps beside them;
* ``kv_bytes``: the KV cache's tensors (activations, reported apart);
* ``stored_bytes``: ``compression_stats(model)["model_stored_bytes"]``, what the weights are stored in;
* ``rss_bytes``: the process's resident set (``/proc/self/status`` VmRSS), and its peak (VmHWM).

Compression here is fast on purpose (``solver="fast", fast_steps=0``, 4 calibration sequences of 128
tokens): bytes depend on the shapes and storage types, not on how well the codes were fitted.

    python benchmarks/memory.py                      # CR 0.3 and 0.5, float32 and + int8
    python benchmarks/memory.py --ratios 0.3 --prompt 128 --decode 8
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, environment, fresh_copy, load_default, write_json
from torchao.quantization import Int8WeightOnlyConfig

from spadi_ao import DictionaryConfig, compression_stats, quantize_dictionary_, sparsify_dictionary_
from spadi_ao.pipeline.data import calibration_batches, load_text

MIB = 2**20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _tensor_storages(root: Any) -> dict[int, int]:
    """Storages of the plain tensors reachable from ``root`` through lists, tuples, dicts and attributes."""
    found, seen, stack = {}, set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (int, float, str, bool, torch.dtype, torch.device)):
            continue
        seen.add(id(obj))
        if type(obj) in (torch.Tensor, torch.nn.Parameter):
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
    return found


def _live_storages() -> dict[int, int]:
    """Every distinct plain tensor storage reachable from Python objects (weights, caches, activations)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return storages


def _snapshot(stage: str, model, apart: tuple = ()) -> dict[str, Any]:
    """Bytes held right now, with the tensors reachable from ``apart`` (KV cache, logits, ids) split off."""
    live = _live_storages()
    kv = _tensor_storages(apart[0]) if apart else {}
    others = _tensor_storages(apart[1:]) if apart else {}
    weights = {ptr: size for ptr, size in live.items() if ptr not in kv and ptr not in others}
    return {
        "stage": stage,
        "weight_bytes": sum(weights.values()),
        "kv_bytes": sum(kv.values()),
        "rss_bytes": _status("VmRSS"),
        "peak_rss_bytes": _status("VmHWM"),
        "stored_bytes": compression_stats(model)["model_stored_bytes"],
    }


def measure(path: Path, kind: str, prompt_tokens: int, decode_steps: int, threads: int) -> list[dict[str, Any]]:
    """Load the model saved at ``path`` and record its bytes after loading, prefill and decoding."""
    torch.set_num_threads(threads)
    if kind == "dense":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        from spadi_ao.serialization import load_compressed

        model, _ = load_compressed(path)
    model.eval()
    rows = [_snapshot("loaded", model)]
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        output = model(ids, use_cache=True)
        cache, logits = output.past_key_values, output.logits[:, -1:]
        del output
        rows.append(_snapshot(f"prefill {prompt_tokens}", model, (cache, logits, ids)))
        for _ in range(decode_steps):
            step = logits.argmax(-1)
            output = model(step, past_key_values=cache, use_cache=True)
            cache, logits = output.past_key_values, output.logits
            del output
        rows.append(_snapshot(f"+ decode {decode_steps}", model, (cache, logits, ids, step)))
    return rows


def prepare(work: Path, ratios: list[float], int8: bool) -> dict[str, tuple[Path, str]]:
    """Save the dense model and each compressed variant under ``work`` (reused when already there)."""
    variants = {"dense": (work / "dense", "dense")}
    for ratio in ratios:
        variants[f"CoSpaDi CR {ratio}"] = (work / f"cr{ratio}", "compressed")
        if int8:
            variants[f"CoSpaDi CR {ratio} + int8"] = (work / f"cr{ratio}-int8", "compressed")
    if all(path.exists() for path, _ in variants.values()):
        return variants
    from spadi_ao.serialization import save_compressed

    model, tokenizer = load_default()
    model.eval()
    if not variants["dense"][0].exists():
        model.save_pretrained(variants["dense"][0])
    batches = calibration_batches(tokenizer, load_text(None), 4, 128)
    for ratio in ratios:
        compressed = fresh_copy(model)
        config = DictionaryConfig(compression_ratio=ratio, solver="fast", fast_steps=0, gram_shrinkage=0.0)
        sparsify_dictionary_(compressed, config, calibration=batches, progress=False)
        save_compressed(compressed, work / f"cr{ratio}", overwrite=True)
        if int8:
            quantize_dictionary_(compressed, Int8WeightOnlyConfig(set_inductor_config=False), values_dtype="int8")
            save_compressed(compressed, work / f"cr{ratio}-int8", overwrite=True)
    return variants


def table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    dense = {row["stage"]: row for row in results["dense"]}
    lines = [
        "| model | stage | stored MiB | weight MiB (live) | weight / stored | KV cache MiB | RSS MiB | RSS vs "
        "dense | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for row in rows:
            lines.append(
                f"| {name} | {row['stage']} | {row['stored_bytes'] / MIB:.1f} | {row['weight_bytes'] / MIB:.1f} "
                f"| {row['weight_bytes'] / row['stored_bytes']:.3f} | {row['kv_bytes'] / MIB:.1f} | "
                f"{row['rss_bytes'] / MIB:.0f} "
                f"| {row['rss_bytes'] / dense[row['stage']]['rss_bytes']:.2f}x | {row['peak_rss_bytes'] / MIB:.0f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--no-int8", action="store_true", help="skip the variants with int8 dictionaries and values")
    parser.add_argument("--prompt", type=int, default=512, help="prefill tokens")
    parser.add_argument("--decode", type=int, default=64, help="decode steps after the prefill")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "spadi-ao-memory-benchmark",
        help="where the saved models go (reused by later runs)",
    )
    parser.add_argument("--name", default="memory")
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)  # child process: one model
    parser.add_argument("--kind", default="dense", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.kind, args.prompt, args.decode, args.threads)))
        return

    started = time.time()
    variants = prepare(args.work, args.ratios, not args.no_int8)
    results = {}
    for name, (path, kind) in variants.items():
        command = [sys.executable, __file__, "--measure", str(path), "--kind", kind, "--prompt", str(args.prompt),
                   "--decode", str(args.decode), "--threads", str(args.threads)]  # fmt: skip
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name][-1]}", flush=True)
    header = (
        f"SmolLM2-135M-Instruct, float32, {args.threads} threads; one process per model; prefill of {args.prompt} "
        f"random tokens, then {args.decode} greedy decode steps with a KV cache."
    )
    lines = table(results)
    print("\n" + header + "\n\n" + "\n".join(lines))
    payload = {"environment": environment(), "command": " ".join(sys.argv), "seconds": round(time.time() - started, 1),
               "compression": "DictionaryConfig(compression_ratio=r, solver='fast', fast_steps=0, gram_shrinkage=0.0), "
                              "4 x 128 calibration tokens; + int8: quantize_dictionary_(Int8WeightOnlyConfig(), "
                              "values_dtype='int8')",
               "results": results}  # fmt: skip
    write_json(RESULTS / f"{args.name}.json", payload)
    (RESULTS / f"{args.name}.md").write_text(f"# Run-time memory\n\n{header}\n\n" + "\n".join(lines) + "\n")
    print(f"\nwrote {RESULTS / args.name}.json and .md")


if __name__ == "__main__":
    main()
