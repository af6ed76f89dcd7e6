"""Perplexity windowing and formulas against plain reference loops, and word counts against lm-eval's."""

from __future__ import annotations

import math
import re

import pytest
import torch
from lm_eval.api.task import ConfigurableTask

from spadi_ao.pipeline import PipelineError, encode_text, perplexity

# ------------------------------------------------------------------------------------------------ perplexity


@pytest.fixture
def ppl_text(stdlib_text: str) -> str:
    return stdlib_text[:6_000]


def test_perplexity_matches_a_plain_loop_over_windows(tiny_llama, tiny_tokenizer, ppl_text):
    seq_len = 64
    ids = encode_text(tiny_tokenizer, ppl_text)
    n_windows = len(ids) // seq_len
    assert n_windows >= 5
    result = perplexity(tiny_llama, tiny_tokenizer, ppl_text, seq_len=seq_len, batch_size=3, progress=False)
    assert result.n_windows == n_windows
    assert result.n_tokens == n_windows * (seq_len - 1)
    assert result.seq_len == seq_len and result.word_ppl is None
    with torch.no_grad():
        losses = [tiny_llama(w[None], labels=w[None]).loss.item() for w in ids[: n_windows * seq_len].view(-1, seq_len)]
    assert result.nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert result.to_dict()["ppl"] == result.ppl


def test_max_windows_takes_the_first_windows(tiny_llama, tiny_tokenizer, ppl_text):
    seq_len = 64
    first_two = encode_text(tiny_tokenizer, ppl_text)[: 2 * seq_len]
    limited = perplexity(tiny_llama, tiny_tokenizer, ppl_text, seq_len=seq_len, max_windows=2, progress=False)
    assert (limited.n_windows, limited.n_tokens) == (2, 2 * (seq_len - 1))
    with torch.no_grad():
        loss = tiny_llama(first_two.view(2, seq_len), labels=first_two.view(2, seq_len)).loss.item()
    assert limited.nll == pytest.approx(loss, rel=1e-5)


def test_word_and_byte_perplexity_use_the_evaluated_span(tiny_llama, tiny_tokenizer, ppl_text):
    seq_len = 64
    result = perplexity(tiny_llama, tiny_tokenizer, ppl_text, seq_len=seq_len, word_level=True, progress=False)
    evaluated = encode_text(tiny_tokenizer, ppl_text)[: result.n_windows * seq_len]
    span = tiny_tokenizer.decode(evaluated)  # byte-level BPE decodes back to the exact characters
    assert ppl_text.startswith(span) and len(span) < len(ppl_text)
    assert result.n_words == len(re.split(r"\s+", span))
    assert result.n_bytes == len(span.encode("utf-8"))
    # lm-eval's own counts for word / byte perplexity (its WikiText task divides the NLL by these)
    assert (result.n_words, result.n_bytes) == (ConfigurableTask.count_words(span), ConfigurableTask.count_bytes(span))
    total_nll = result.nll * result.n_tokens
    assert result.word_ppl == pytest.approx(math.exp(total_nll / result.n_words), rel=1e-9)
    assert result.byte_ppl == pytest.approx(math.exp(total_nll / result.n_bytes), rel=1e-9)
    assert result.ppl == pytest.approx(
        perplexity(tiny_llama, tiny_tokenizer, ppl_text, seq_len=seq_len, progress=False).ppl
    )


def test_perplexity_prints_nothing_and_restores_train_mode(tiny_llama, tiny_tokenizer, ppl_text, capsys):
    tiny_llama.train()
    perplexity(tiny_llama, tiny_tokenizer, ppl_text, seq_len=64, max_windows=1, progress=False)
    assert tiny_llama.training
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 257}, r"seq_len must be in \[2, 256\]"),
        ({"seq_len": 1}, r"seq_len must be in \[2, 256\]"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_windows": 0}, "max_windows must be >= 1"),
    ],
)
def test_perplexity_argument_errors(tiny_llama, tiny_tokenizer, ppl_text, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        perplexity(tiny_llama, tiny_tokenizer, ppl_text, progress=False, **{"seq_len": 64, **kwargs})


def test_perplexity_text_too_short(tiny_llama, tiny_tokenizer):
    n = len(encode_text(tiny_tokenizer, "a short text"))
    with pytest.raises(PipelineError, match=rf"text has {n} tokens, fewer than one window of seq_len=128"):
        perplexity(tiny_llama, tiny_tokenizer, "a short text", seq_len=128, progress=False)
