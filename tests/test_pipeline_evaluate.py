"""Perplexity windowing and formulas, and the multiple-choice scorer, against plain reference loops."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from spadi_ao.pipeline import (
    MC_TASKS,
    PipelineError,
    encode_text,
    load_mc_task,
    multiple_choice_accuracy,
    perplexity,
    zero_shot,
)
from spadi_ao.pipeline import evaluate as evaluate_module


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


# ------------------------------------------------------------------------------------------- multiple choice

ARC_ITEMS = [
    {
        "id": "q1",
        "question": "What do plants need to grow?",
        "choices": ["light", "darkness and cold", "nothing"],
        "gold": 0,
    },
    {
        "id": "q2",
        "question": "Which is a liquid?",
        "choices": ["ice", "water", "steam vapour cloud", "rock"],
        "gold": 1,
    },
    {"id": "q3", "question": "The sun is a", "choices": ["star", "planet"], "gold": 0},
]


def _write_arc(root: Path) -> Path:
    (root / "arc").mkdir()
    lines = "\n".join(json.dumps(item) for item in ARC_ITEMS) + "\n"
    (root / "arc" / "ARC-Easy-Test.reconstructed.jsonl").write_text(lines)
    return root


def _brute_force_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One unpadded forward per request, lm-eval's token split, a plain loop over continuation tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        log_probs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(log_probs[pos - 1, whole[pos]].item() for pos in range(n_context, len(whole)))


def test_scorer_matches_brute_force_on_hand_made_items(tiny_llama, tiny_tokenizer, tmp_path):
    data_dir = _write_arc(tmp_path)
    result = multiple_choice_accuracy(tiny_llama, tiny_tokenizer, "arc_easy", data_dir, batch_size=4, progress=False)
    correct = correct_norm = 0
    for item in ARC_ITEMS:
        context = f"Question: {item['question']}\nAnswer:"
        lls = np.array(
            [_brute_force_loglikelihood(tiny_llama, tiny_tokenizer, context, " " + c) for c in item["choices"]]
        )
        correct += int(np.argmax(lls) == item["gold"])
        correct_norm += int(np.argmax(lls / np.array([len(c) for c in item["choices"]])) == item["gold"])
    assert result == {"task": "arc_easy", "acc": correct / 3, "acc_norm": correct_norm / 3, "n": 3}


def test_batched_scores_equal_unpadded_scores(tiny_llama, tiny_tokenizer):
    requests = [(f"Question: {i['question']}\nAnswer:", " " + c) for i in ARC_ITEMS for c in i["choices"]]
    batched = evaluate_module._loglikelihoods(tiny_llama, tiny_tokenizer, requests, batch_size=5, progress=False)
    reference = [_brute_force_loglikelihood(tiny_llama, tiny_tokenizer, c, x) for c, x in requests]
    assert batched == pytest.approx(reference, abs=1e-4)


def test_trailing_context_spaces_move_to_the_continuation(tiny_tokenizer):
    assert evaluate_module._encode_pair(tiny_tokenizer, "Answer: ", "yes") == evaluate_module._encode_pair(
        tiny_tokenizer, "Answer:", " yes"
    )


def test_task_formats(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(json.dumps({"goal": "Open a jar", "sol1": "twist", "sol2": "bite"}))
    (tmp_path / "piqa" / "valid-labels.lst").write_text("1\n")
    (tmp_path / "hellaswag").mkdir()
    doc = {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "she", "label": 0,
           "endings": ["bakes it [title] now.", "eats  it."]}  # fmt: skip
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text(json.dumps(doc))
    (tmp_path / "winogrande").mkdir()
    doc = {"sentence": "Tom gave Bob a book because _ was kind.", "option1": "Tom", "option2": "Bob", "answer": "1"}
    (tmp_path / "winogrande" / "dev.jsonl").write_text(json.dumps(doc))
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "dev.jsonl").write_text(
        json.dumps({"question": "is it", "passage": "It is.", "answer": True})
    )

    (piqa,) = load_mc_task("piqa", tmp_path)
    assert (piqa.contexts[0], piqa.continuations, piqa.gold) == (
        "Question: Open a jar\nAnswer:",
        [" twist", " bite"],
        1,
    )
    (hella,) = load_mc_task("hellaswag", tmp_path)
    assert hella.contexts[0] == "Baking: She mixes flour. She"
    assert hella.continuations == [" bakes it. now.", " eats it."]
    (wino,) = load_mc_task("winogrande", tmp_path)
    assert wino.contexts == ["Tom gave Bob a book because Tom", "Tom gave Bob a book because Bob"]
    assert wino.continuations == [" was kind."] * 2 and wino.gold == 0
    (boolq,) = load_mc_task("boolq", tmp_path)
    assert (boolq.contexts[1], boolq.continuations, boolq.gold) == (
        "It is.\nQuestion: is it?\nAnswer:",
        [" no", " yes"],
        1,
    )


def test_acc_norm_is_none_where_lm_eval_reports_none(tiny_llama, tiny_tokenizer, tmp_path):
    (tmp_path / "winogrande").mkdir()
    doc = {"sentence": "Tom gave Bob a book because _ was kind.", "option1": "Tom", "option2": "Bob", "answer": "2"}
    (tmp_path / "winogrande" / "dev.jsonl").write_text(json.dumps(doc))
    result = multiple_choice_accuracy(tiny_llama, tiny_tokenizer, "winogrande", tmp_path, progress=False)
    assert result["acc_norm"] is None and result["n"] == 1


def test_limit_and_task_errors(tiny_llama, tiny_tokenizer, tmp_path):
    data_dir = _write_arc(tmp_path)
    assert len(load_mc_task("arc_easy", data_dir, limit=2)) == 2
    with pytest.raises(PipelineError, match="task must be one of piqa, arc_easy"):
        load_mc_task("mmlu", data_dir)
    with pytest.raises(PipelineError, match="missing .*ARC-Challenge"):
        load_mc_task("arc_challenge", data_dir)
    with pytest.raises(PipelineError, match="limit must be >= 1"):
        load_mc_task("arc_easy", data_dir, limit=0)


@pytest.mark.skipif(not Path("../shared/data/zeroshot").is_dir(), reason="shared zero-shot data not present")
def test_shared_task_files_parse():
    for task in MC_TASKS:
        items = load_mc_task(task, "../shared/data/zeroshot", limit=3)
        assert len(items) == 3
        assert all(0 <= item.gold < len(item.choices) == len(item.contexts) for item in items)


# -------------------------------------------------------------------------------------------------- zero_shot


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_zero_shot_without_lm_eval_says_what_to_install(tiny_llama, tiny_tokenizer, tmp_path):
    with pytest.raises(PipelineError, match="pip install lm-eval"):
        zero_shot(tiny_llama, tiny_tokenizer, ["arc_easy"], tmp_path)


def test_zero_shot_sends_local_requests_to_hflm(tiny_llama, tiny_tokenizer, tmp_path, monkeypatch):
    """A stand-in lm_eval with the two names zero_shot uses: the requests it builds must score like ours."""

    class Instance:
        def __init__(self, request_type, doc, arguments, idx, metadata):
            self.request_type, self.arguments = request_type, arguments

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            self.model, self.tokenizer = pretrained, tokenizer

        def loglikelihood(self, requests):
            assert {r.request_type for r in requests} == {"loglikelihood"}
            pairs = [r.arguments for r in requests]
            return [(ll, False) for ll in evaluate_module._loglikelihoods(self.model, self.tokenizer, pairs, 1, False)]

    modules = {
        "lm_eval": types.ModuleType("lm_eval"),
        "lm_eval.api": types.ModuleType("lm_eval.api"),
        "lm_eval.api.instance": types.SimpleNamespace(Instance=Instance),
        "lm_eval.models": types.ModuleType("lm_eval.models"),
        "lm_eval.models.huggingface": types.SimpleNamespace(HFLM=HFLM),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    data_dir = _write_arc(tmp_path)
    expected = multiple_choice_accuracy(tiny_llama, tiny_tokenizer, "arc_easy", data_dir, progress=False)
    assert zero_shot(tiny_llama, tiny_tokenizer, ["arc_easy"], data_dir) == {"arc_easy": expected}
