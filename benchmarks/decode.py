"""End-to-end greedy decode speed: SmolLM2-135M dense vs CoSpaDi-compressed, eager and compiled.

Decode tokens/s is measured without the prompt: each repeat times ``generate`` for ``1`` and for
``1 + --new-tokens`` new tokens from the same prompt and divides the extra tokens by the extra time.
Models are timed in interleaved rounds (dense, CR 0.3, CR 0.5 in turn) so background load hits all
alike; the median over rounds is reported with its min and max.

Speed does not depend on how good the codes are, only on their shapes, so the compressed models are
built with the fast solver at ``fast_steps=0`` on a small calibration set (seconds, not minutes); the
shapes (``k``, ``s``) are those the honest budget gives at each ratio, exactly as a full run would.

* eager: ``generate`` with the dynamic KV cache;
* compiled: ``generate`` with a static KV cache and ``CompileConfig(fullgraph=True)`` on every device
  (transformers compiles the decode step; the first rounds pay for compilation and are discarded).

    python benchmarks/decode.py                        # writes benchmarks/results/decode_cpu.{json,md}
    python benchmarks/decode.py --modes eager --new-tokens 16 --rounds 2
    python benchmarks/decode.py --int8 --modes eager --name decode_cpu_int8   # also int8 dictionary + values
    python benchmarks/decode.py --dtype bfloat16 --modes eager --name decode_cpu_bf16   # a bfloat16 model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import RESULTS, environment, fresh_copy, linear_bytes, load_default, write_json
from torchao.quantization import Int8WeightOnlyConfig
from transformers import CompileConfig

from spadi_ao import DictionaryConfig, quantize_dictionary_, sparsify_dictionary_
from spadi_ao.api import select_linears
from spadi_ao.pipeline.data import calibration_batches, load_text

PROMPT_TOKENS = 32


def compressed(model, tokenizer, ratio: float):
    batches = calibration_batches(tokenizer, load_text(None), 4, 128)
    copy = fresh_copy(model)
    # Decode speed follows each layer's k and s, not the solver's values: uniform per-layer weights keep every
    # layer at the row's ratio (the default's knapsack and shared dictionaries would mix ratios and layouts).
    config = DictionaryConfig(
        compression_ratio=ratio, solver="fast", fast_steps=0, gram_shrinkage=0.0, allocation="uniform", grouping=None
    )
    report = sparsify_dictionary_(copy, config, calibration=batches, progress=False)
    return copy, report.compression_ratio


def generate_kwargs(mode: str, new_tokens: int, pad_token_id: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    if mode == "compiled":
        compile_config = CompileConfig(
            fullgraph=True, mode="reduce-overhead" if torch.cuda.is_available() else "default"
        )
        compile_config._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
        kwargs |= dict(cache_implementation="static", compile_config=compile_config)
    return kwargs


def timed_generate(
    model, prompt: torch.Tensor, mode: str, new_tokens: int, pad_token_id: int
) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    output = model.generate(prompt, **generate_kwargs(mode, new_tokens, pad_token_id))
    return time.perf_counter() - start, output


def decode_seconds_per_token(
    model, prompt, mode: str, new_tokens: int, pad_token_id: int
) -> tuple[float, torch.Tensor]:
    """Seconds per decoded token: (time for 1 + n new tokens - time for 1) / n."""
    first, _ = timed_generate(model, prompt, mode, 1, pad_token_id)
    full, output = timed_generate(model, prompt, mode, 1 + new_tokens, pad_token_id)
    return max(full - first, 1e-9) / new_tokens, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per model and mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (compilation happens here)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--int8", action="store_true", help="also each ratio with int8 dictionaries and code values")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the model's dtype, set before compressing (so the dictionaries are stored in it)",
    )
    parser.add_argument("--name", default=f"decode_{'cuda' if torch.cuda.is_available() else 'cpu'}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_default()
    model.to(getattr(torch, args.dtype)).eval()
    models = {"dense": (model, 0.0)}
    names = list(select_linears(model))
    for ratio in args.ratios:
        models[f"cospadi CR {ratio}"] = compressed(model, tokenizer, ratio)
        if args.int8:  # the same compression with int8 parts (spadi_ao.integrations.torchao)
            int8_model = fresh_copy(models[f"cospadi CR {ratio}"][0])
            quantize_dictionary_(int8_model, Int8WeightOnlyConfig(set_inductor_config=False), values_dtype="int8")
            models[f"cospadi CR {ratio} + int8"] = (
                int8_model,
                1 - linear_bytes(int8_model, names) / linear_bytes(model, names),
            )
    prompt = calibration_batches(tokenizer, load_text(None), 1, PROMPT_TOKENS, seed=7)[0].reshape(1, -1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rows, eager_outputs = [], {}
    with torch.inference_mode():
        for mode in args.modes:
            samples: dict[str, list[float]] = {name: [] for name in models}
            outputs = {}
            for round_index in range(args.warmup + args.rounds):
                for name, (candidate, _) in models.items():
                    seconds, outputs[name] = decode_seconds_per_token(candidate, prompt, mode, args.new_tokens, pad)
                    if round_index >= args.warmup:
                        samples[name].append(seconds)
            for name, (candidate, achieved) in models.items():
                median = statistics.median(samples[name])
                rows.append(
                    {
                        "model": name,
                        "compression_ratio": achieved,
                        "mode": mode,
                        "tokens_per_s": 1.0 / median,
                        "tokens_per_s_min": 1.0 / max(samples[name]),
                        "tokens_per_s_max": 1.0 / min(samples[name]),
                        "ms_per_token": median * 1e3,
                        "same_tokens_as_eager": bool(torch.equal(outputs[name], eager_outputs[name]))
                        if name in eager_outputs
                        else None,
                    }
                )
                print(f"{mode:8s} {name:16s} {1.0 / median:7.1f} tok/s ({median * 1e3:.1f} ms/token)", flush=True)
            if mode == "eager":
                eager_outputs = outputs

    dense_speed = {row["mode"]: row["tokens_per_s"] for row in rows if row["model"] == "dense"}
    table = [
        "| mode | model | achieved CR | tokens/s (median) | min - max | ms/token | vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        table.append(
            f"| {row['mode']} | {row['model']} | {row['compression_ratio']:.3f} | {row['tokens_per_s']:.1f} | "
            f"{row['tokens_per_s_min']:.1f} - {row['tokens_per_s_max']:.1f} | {row['ms_per_token']:.1f} | "
            f"{row['tokens_per_s'] / dense_speed[row['mode']]:.2f}x |"
        )
    header = (
        f"SmolLM2-135M-Instruct, {args.dtype}, greedy decode of {args.new_tokens} tokens after a "
        f"{PROMPT_TOKENS}-token prompt, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds after {args.warmup} warm-up rounds."
    )
    print("\n" + header + "\n\n" + "\n".join(table))
    payload = {
        "command": " ".join(["python", *sys.argv]),
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "prompt_tokens": PROMPT_TOKENS,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "rows": rows,
        "environment": environment(),
    }
    write_json(RESULTS / f"{args.name}.json", payload)
    (RESULTS / f"{args.name}.md").write_text(header + "\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
