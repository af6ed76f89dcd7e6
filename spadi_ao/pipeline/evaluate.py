"""Quality measures for a (compressed) causal LM: windowed perplexity and zero-shot multiple-choice accuracy.

Perplexity follows the GPTQ / SVD-LLM convention so numbers compare with the papers: tokenise the whole
text once, cut it into ``floor(N / seq_len)`` non-overlapping windows, and average the next-token loss over
the ``seq_len - 1`` predicted tokens of every window.

Multiple-choice accuracy follows lm-eval-harness's zero-shot formulation: each choice is scored by the summed
log-likelihood of its continuation given the context; ``acc`` takes the best sum, ``acc_norm`` the best sum
divided by the choice's length in characters (lm-eval calls it byte length but divides by ``len(str)``).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spadi_ao.pipeline import PipelineError
from spadi_ao.pipeline.data import encode_text
from spadi_ao.pipeline.models import model_context_length

__all__ = ["PerplexityResult", "perplexity", "multiple_choice_accuracy", "zero_shot", "MC_TASKS", "load_mc_task"]


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


# --------------------------------------------------------------------------------------------- multiple choice


@dataclass
class MCItem:
    """One question: a (context, continuation) request per choice, and the strings ``acc_norm`` divides by."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    choices: list[str]


@dataclass(frozen=True)
class MCTask:
    """Where a task's local files are and how lm-eval turns one record into requests."""

    files: tuple[str, ...]
    to_item: Callable[[dict[str, Any]], MCItem]
    reports_acc_norm: bool = True


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _plain_item(context: str, choices: list[str], gold: int) -> MCItem:
    """lm-eval's default: one context, and each choice is a continuation after a single space."""
    return MCItem([context] * len(choices), [" " + c for c in choices], gold, choices)


def _piqa(doc: dict[str, Any]) -> MCItem:
    return _plain_item(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _arc(doc: dict[str, Any]) -> MCItem:
    return _plain_item(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]), int(doc["gold"]))


def _hellaswag(doc: dict[str, Any]) -> MCItem:
    context = _hellaswag_clean(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    return _plain_item(context, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _winogrande(doc: dict[str, Any]) -> MCItem:
    """Partial evaluation: the option fills the blank in the context, and the rest of the sentence is scored."""
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
    continuation = " " + doc["sentence"][blank + 1 :].strip()
    return MCItem(contexts, [continuation] * 2, int(doc["answer"]) - 1, contexts)


def _boolq(doc: dict[str, Any]) -> MCItem:
    return _plain_item(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["answer"]))


MC_TASKS: dict[str, MCTask] = {
    "piqa": MCTask(("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),
    "arc_easy": MCTask(("arc/ARC-Easy-Test.reconstructed.jsonl",), _arc),
    "arc_challenge": MCTask(("arc/ARC-Challenge-Test.reconstructed.jsonl",), _arc),
    "hellaswag": MCTask(("hellaswag/hellaswag_val.jsonl",), _hellaswag),
    "winogrande": MCTask(("winogrande/dev.jsonl",), _winogrande, reports_acc_norm=False),
    "boolq": MCTask(("boolq/dev.jsonl",), _boolq, reports_acc_norm=False),
}
"""Local multiple-choice tasks; file paths are relative to the zero-shot data folder."""


def load_mc_task(task: str, data_dir: str | Path, limit: int | None = None) -> list[MCItem]:
    """The first ``limit`` records of ``task`` (lm-eval's ``--limit``) as scoring items."""
    if task not in MC_TASKS:
        raise PipelineError(f"task must be one of {', '.join(MC_TASKS)}, got {task!r}")
    if limit is not None and limit < 1:
        raise PipelineError(f"limit must be >= 1 or None, got {limit}")
    spec = MC_TASKS[task]
    paths = [Path(data_dir) / name for name in spec.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise PipelineError(f"task {task!r}: missing {', '.join(missing)} (data_dir={data_dir})")
    with paths[0].open(encoding="utf-8") as lines:
        docs = [json.loads(line) for line in itertools.islice(filter(str.strip, lines), limit)]
    if len(paths) > 1:  # PIQA keeps its labels in a separate file, one per line
        labels = paths[1].read_text(encoding="utf-8").split()
        if len(labels) < len(docs):
            raise PipelineError(f"task {task!r}: {paths[1]} has fewer labels than {paths[0]} has records")
        docs = [{**doc, "label": label} for doc, label in zip(docs, labels[: len(docs)], strict=True)]
    return [spec.to_item(doc) for doc in docs]


def _encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces move to the continuation, and the continuation's tokens are whatever
    follows the context's tokens in the encoding of the joined string (no special tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False, verbose=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


@torch.inference_mode()
def _loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[tuple[str, str]],
    batch_size: int,
    progress: bool,
) -> list[float]:
    """Summed log-probability of each continuation given its context, batched longest first with right padding."""
    max_input = model_context_length(model)
    inputs: list[list[int]] = []
    targets: list[torch.Tensor] = []
    for context, continuation in requests:
        context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation)
        if not context_ids or not continuation_ids:
            raise PipelineError(f"empty context or continuation in request {(context, continuation)!r}")
        whole = (context_ids + continuation_ids)[-(max_input + 1) :]
        inputs.append(whole[:-1])
        targets.append(torch.tensor(continuation_ids))
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    scores = [0.0] * len(requests)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=not progress):
            rows = order[start : start + batch_size]
            width = len(inputs[rows[0]])
            batch = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for r, i in enumerate(rows):
                batch[r, : len(inputs[i])] = torch.tensor(inputs[i])
                mask[r, : len(inputs[i])] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for r, i in enumerate(rows):
                end = len(inputs[i])  # the last len(targets[i]) positions predict the continuation
                log_probs = logits[r, end - len(targets[i]) : end].float().log_softmax(-1).cpu()
                scores[i] = log_probs.gather(-1, targets[i][:, None]).sum().item()
    finally:
        model.train(was_training)
    return scores


def _accuracy(task: str, items: list[MCItem], scores: list[float]) -> dict[str, Any]:
    """lm-eval's per-item argmax (first index wins ties), averaged over items."""
    correct = correct_norm = 0
    offset = 0
    for item in items:
        lls = scores[offset : offset + len(item.choices)]
        offset += len(item.choices)
        correct += max(range(len(lls)), key=lambda j: (lls[j], -j)) == item.gold
        normed = [ll / len(choice) for ll, choice in zip(lls, item.choices, strict=True)]
        correct_norm += max(range(len(normed)), key=lambda j: (normed[j], -j)) == item.gold
    return {
        "task": task,
        "acc": correct / len(items),
        "acc_norm": correct_norm / len(items) if MC_TASKS[task].reports_acc_norm else None,
        "n": len(items),
    }


def _requests(items: list[MCItem]) -> list[tuple[str, str]]:
    return [pair for item in items for pair in zip(item.contexts, item.continuations, strict=True)]


def multiple_choice_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot ``acc`` / ``acc_norm`` of one of :data:`MC_TASKS` on its local files, without lm-eval.

    Returns ``{"task", "acc", "acc_norm", "n"}``; ``acc_norm`` is None where lm-eval reports none
    (winogrande, boolq).
    """
    if batch_size < 1:
        raise PipelineError(f"batch_size must be >= 1, got {batch_size}")
    items = load_mc_task(task, data_dir, limit)
    return _accuracy(task, items, _loglikelihoods(model, tokenizer, _requests(items), batch_size, progress))


def zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    data_dir: str | Path | None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy computed by lm-eval-harness's ``HFLM`` wrapped around the in-memory model.

    With a ``data_dir`` the tasks are :data:`MC_TASKS` read from local files and lm-eval only scores the
    requests; with ``data_dir=None`` lm-eval runs its own task definitions (which download their datasets).
    Returns ``{task: {"task", "acc", "acc_norm", "n"}}``.
    """
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError as error:
        raise PipelineError(
            "zero_shot needs lm-eval: pip install lm-eval (multiple_choice_accuracy scores the local tasks without it)"
        ) from error
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if data_dir is None:
        return _lm_eval_tasks(lm, tasks, limit)
    results = {}
    for task in tasks:
        items = load_mc_task(task, data_dir, limit)
        requests = [
            Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i, metadata=(task, i, 1))
            for i, pair in enumerate(_requests(items))
        ]
        results[task] = _accuracy(task, items, [ll for ll, _ in lm.loglikelihood(requests)])
    return results


def _lm_eval_tasks(lm: Any, tasks: list[str], limit: int | None) -> dict[str, dict[str, Any]]:
    import lm_eval

    output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    results = {}
    for task, metrics in output["results"].items():
        values = {key.split(",")[0]: value for key, value in metrics.items()}
        results[task] = {
            "task": task,
            "acc": values.get("acc"),
            "acc_norm": values.get("acc_norm"),
            "n": output.get("n-samples", {}).get(task, {}).get("effective"),
        }
    return results
