"""Perplexity of a (compressed) causal LM over non-overlapping windows.

Perplexity follows the GPTQ / SVD-LLM convention so numbers compare with the papers: tokenise the whole
text once, cut it into ``floor(N / seq_len)`` non-overlapping windows, and average the next-token loss over
the ``seq_len - 1`` predicted tokens of every window.

Zero-shot accuracy is lm-eval-harness's own (see :mod:`spadi_ao.pipeline.lm_eval_tasks`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spadi_ao.pipeline import PipelineError
from spadi_ao.pipeline.data import encode_text
from spadi_ao.pipeline.models import model_context_length

__all__ = ["PerplexityResult", "perplexity"]


@dataclass
class PerplexityResult:
    """Token-level perplexity, plus lm-eval-style word / byte perplexity when ``word_level=True``.

    ``nll`` is the mean negative log-likelihood in nats per predicted token; ``ppl = exp(nll)``.
    """

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int
    seq_len: int
    word_ppl: float | None = None
    n_words: int | None = None
    byte_ppl: float | None = None
    n_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seq_len: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    word_level: bool = False,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` over non-overlapping ``seq_len``-token windows (the first
    ``max_windows`` of them if given).

    With ``word_level=True`` the total NLL is also divided by the words and UTF-8 bytes of the evaluated
    span, which is ``text`` from its first character to the end of the last token of the last evaluated
    window (the tail that does not fill a window is left out). Words are counted as lm-eval counts them for
    WikiText, ``len(re.split(r"\\s+", span))``. The NLL differs from lm-eval's rolling-window score, which
    also predicts the first token of each window, so the numbers are close but not identical.
    """
    context = model_context_length(model)
    if not 2 <= seq_len <= context:
        raise PipelineError(f"seq_len must be in [2, {context}] (the model's context length), got {seq_len}")
    if batch_size < 1:
        raise PipelineError(f"batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise PipelineError(f"max_windows must be >= 1 or None, got {max_windows}")
    if word_level:
        if not getattr(tokenizer, "is_fast", False):
            raise PipelineError("word_level=True needs a fast tokenizer (it maps tokens back to characters)")
        encoding = tokenizer(text, verbose=False, return_offsets_mapping=True)
        ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    else:
        ids = encode_text(tokenizer, text)
    n_windows = len(ids) // seq_len
    if n_windows == 0:
        raise PipelineError(f"text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)

    total_nll = 0.0
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress) as bar:
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
                total_nll += F.cross_entropy(
                    logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
                ).item()
                bar.update(len(batch))
    finally:
        model.train(was_training)

    n_tokens = n_windows * (seq_len - 1)
    nll = total_nll / n_tokens
    result = PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=n_tokens, n_windows=n_windows, seq_len=seq_len)
    if word_level:
        span_end = max(end for _, end in encoding["offset_mapping"][: n_windows * seq_len])
        span = text[:span_end]
        result.n_words = len(re.split(r"\s+", span))
        result.n_bytes = len(span.encode("utf-8"))
        result.word_ppl = math.exp(total_nll / result.n_words)
        result.byte_ppl = math.exp(total_nll / result.n_bytes)
    return result
