"""Tutorial 2: deploy a compressed model with torch.compile.

Compress SmolLM2-135M-Instruct, then generate greedily with the dense and the compressed model, eager and
compiled (``fullgraph=True``: every compressed Linear is one ``spadi_ao::dictionary_linear`` op in the graph),
and time them. Generation writes into a fixed-length token buffer, so every step has the same shapes and the
model compiles once; causal attention keeps the not-yet-written positions from affecting earlier logits.

    python tutorials/02_compile_deploy.py          # the embedded model, a few minutes on CPU
    python tutorials/02_compile_deploy.py --tiny   # a tiny random model
"""

from __future__ import annotations

import copy
import time

import torch
from _setup import parser, setup

from spadi_ao import DictionaryConfig, sparsify_dictionary_

PROMPT = "The built-in function len() returns"


@torch.inference_mode()
def greedy(forward, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """``new_tokens`` greedy tokens after ``prompt`` (1, p), and the mean seconds per token after the first."""
    length = prompt.shape[1]
    buffer = torch.zeros(1, length + new_tokens, dtype=torch.long)
    buffer[:, :length] = prompt
    times = []
    for position in range(length, length + new_tokens):
        start = time.perf_counter()
        logits = forward(input_ids=buffer, use_cache=False).logits
        buffer[0, position] = logits[0, position - 1].argmax()
        times.append(time.perf_counter() - start)
    return buffer[:, length:], sum(times[1:]) / max(len(times) - 1, 1)


def main() -> None:
    arguments = parser(__doc__)
    arguments.add_argument("--new-tokens", type=int, default=24)
    arguments.add_argument(
        "--backend", default="inductor", help="torch.compile backend (tests use aot_eager: no C++ build)"
    )
    args = arguments.parse_args()
    run = setup(args.tiny)
    dense = run.model
    compressed = copy.deepcopy(dense)
    sparsify_dictionary_(compressed, DictionaryConfig(compression_ratio=0.3), calibration=run.calibration)

    prompt = run.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    rows = []
    for name, model in (("dense", dense), ("cospadi 0.3", compressed)):
        eager_tokens, eager_seconds = greedy(model, prompt, args.new_tokens)
        compiled = torch.compile(model, fullgraph=True, backend=args.backend)
        start = time.perf_counter()
        compiled_tokens, compiled_seconds = greedy(compiled, prompt, args.new_tokens)
        build = time.perf_counter() - start - compiled_seconds * (args.new_tokens - 1)
        if not torch.equal(compiled_tokens, eager_tokens):
            raise SystemExit(f"{name}: compiled generation differs from eager")
        rows.append((name, eager_seconds, compiled_seconds, build, run.tokenizer.decode(compiled_tokens[0])))

    print(
        f"greedy generation, {args.new_tokens} tokens after {prompt.shape[1]} prompt tokens (full-buffer forward "
        "per token):"
    )
    print(f"{'model':<12} {'eager ms/tok':>12} {'compiled ms/tok':>16} {'compile s':>10}")
    for name, eager_seconds, compiled_seconds, build, _ in rows:
        print(f"{name:<12} {eager_seconds * 1e3:>12.1f} {compiled_seconds * 1e3:>16.1f} {build:>10.1f}")
    for name, *_, text in rows:
        print(f"{name}: {PROMPT!r} + {text!r}")


if __name__ == "__main__":
    main()
