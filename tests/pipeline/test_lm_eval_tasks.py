"""lm-eval-harness on local task files: the stock prompts and metrics, checked against a plain scoring loop."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spadi_ao.cli import main
from spadi_ao.pipeline import PipelineError
from spadi_ao.pipeline.lm_eval_tasks import (
    LOCAL_TASKS,
    local_task_config,
    read_documents,
    task_specs,
    zero_shot,
)
from spadi_ao.serialization import load_compressed

FIXTURES = Path(__file__).parent / "data" / "zeroshot"


# ----------------------------------------------------------------- the reference: lm-eval's formulation, by hand


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _reference_items(task: str) -> list[tuple[list[tuple[str, str]], list[str], int]]:
    """Per fixture record: the (context, continuation) request of each choice, the strings acc_norm divides
    by, and the gold index, written from the task definitions (PIQA, ARC, HellaSwag, WinoGrande, BoolQ)."""
    items = []
    if task == "piqa":
        labels = (FIXTURES / "piqa/valid-labels.lst").read_text().split()
        for record, label in zip(_jsonl(FIXTURES / "piqa/valid.jsonl"), labels, strict=True):
            choices = [record["sol1"], record["sol2"]]
            items.append(([(f"Question: {record['goal']}\nAnswer:", " " + c) for c in choices], choices, int(label)))
    elif task in ("arc_easy", "arc_challenge"):
        name = "Easy" if task == "arc_easy" else "Challenge"
        for record in _jsonl(FIXTURES / f"arc/ARC-{name}-Test.reconstructed.jsonl"):
            context = f"Question: {record['question']}\nAnswer:"
            items.append(([(context, " " + c) for c in record["choices"]], record["choices"], record["gold"]))
    elif task == "hellaswag":
        for record in _jsonl(FIXTURES / "hellaswag/hellaswag_val.jsonl"):
            context = _hellaswag_clean(f"{record['activity_label']}: {record['ctx_a']} {record['ctx_b'].capitalize()}")
            choices = [_hellaswag_clean(ending) for ending in record["endings"]]
            items.append(([(context, " " + c) for c in choices], choices, record["label"]))
    elif task == "winogrande":  # partial scoring: the option fills the blank, the rest of the sentence is scored
        for record in _jsonl(FIXTURES / "winogrande/dev.jsonl"):
            blank = record["sentence"].index("_")
            contexts = [record["sentence"][:blank] + record[f"option{i}"] for i in (1, 2)]
            rest = " " + record["sentence"][blank + 1 :].strip()
            items.append(([(c, rest) for c in contexts], contexts, int(record["answer"]) - 1))
    elif task == "boolq":
        for record in _jsonl(FIXTURES / "boolq/dev.jsonl"):
            context = f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:"
            items.append(([(context, " no"), (context, " yes")], ["no", "yes"], int(record["answer"])))
    return items


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """One unpadded forward; the continuation's tokens are those after the context's in the joined encoding,
    and trailing spaces of the context belong to the continuation (HellaSwag's cleaning can leave one)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        log_probs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    return sum(log_probs[pos - 1, whole[pos]].item() for pos in range(n_context, len(whole)))


def _reference(model, tokenizer, task: str, limit: int | None = None) -> tuple[list[list[float]], float, float]:
    """Per-item choice log-likelihoods, acc and acc_norm (first index wins ties, as numpy's argmax)."""
    items = _reference_items(task)[:limit]
    lls = [[_loglikelihood(model, tokenizer, *request) for request in requests] for requests, _, _ in items]
    acc = np.mean([np.argmax(ll) == gold for ll, (_, _, gold) in zip(lls, items, strict=True)])
    norm = [np.array(ll) / [len(c) for c in choices] for ll, (_, choices, _) in zip(lls, items, strict=True)]
    acc_norm = np.mean([np.argmax(n) == gold for n, (_, _, gold) in zip(norm, items, strict=True)])
    return lls, float(acc), float(acc_norm)


# -------------------------------------------------------------------------------------------------------- tests


def test_lm_eval_on_local_files_matches_the_reference_for_every_task(tiny_llama, tiny_tokenizer):
    """All six tasks through HFLM on the model object: the same requests, log-likelihoods and accuracies."""
    assert any(requests[0][0].endswith(" ") for requests, _, _ in _reference_items("hellaswag"))  # the case above
    result = zero_shot(tiny_llama, tiny_tokenizer, list(LOCAL_TASKS), data_dir=FIXTURES, batch_size=3, log_samples=True)
    for task in LOCAL_TASKS:
        items = _reference_items(task)
        lls, acc, acc_norm = _reference(tiny_llama, tiny_tokenizer, task)
        samples = sorted(result.samples[task], key=lambda sample: sample["doc_id"])
        assert len(samples) == len(items) == result.n_samples[task]
        for sample, (requests, _, gold), reference in zip(samples, items, lls, strict=True):
            assert [tuple(pair) for pair in sample["arguments"]] == requests, task
            assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(reference, abs=1e-4), task
        assert result.results[task]["acc,none"] == pytest.approx(acc), task
        if task in ("winogrande", "boolq"):
            assert "acc_norm,none" not in result.results[task]
            assert result.reported[task] == "acc"
        else:
            assert result.results[task]["acc_norm,none"] == pytest.approx(acc_norm), task
            assert result.reported[task] == "acc_norm"
    reported = [result.results[task][f"{metric},none"] for task, metric in result.reported.items()]
    assert result.average == pytest.approx(np.mean(reported))
    assert result.average_acc == pytest.approx(np.mean([result.results[t]["acc,none"] for t in LOCAL_TASKS]))
    assert "|piqa" in result.table and "acc_norm" in result.table
    assert "samples" not in result.to_dict() and result.to_dict()["sources"]["boolq"].endswith("boolq/dev.jsonl")


def test_cli_eval_runs_lm_eval_on_a_compressed_model(tmp_path, tiny_llama, tiny_tokenizer, capsys):
    source, out, report_file = tmp_path / "tiny", tmp_path / "out", tmp_path / "report.json"
    tiny_llama.save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    compress = [
        "compress",
        "--model",
        str(source),
        "--method",
        "svd-llm",
        "--ratio",
        "0.4",
        "--no-eval",
        "--n-samples",
        "3",
        "--seq-len",
        "32",
    ]
    assert main([*compress, "--output", str(out)]) == 0
    argv = [
        "eval",
        str(out),
        "--tasks",
        "arc_easy,winogrande",
        "--data-dir",
        str(FIXTURES),
        "--limit",
        "5",
        "--batch-size",
        "2",
    ]
    assert main([*argv, "--output", str(report_file)]) == 0
    printed = capsys.readouterr().out
    assert "|arc_easy" in printed and "|winogrande" in printed
    assert "average over 2 tasks (acc_norm: arc_easy; acc: winogrande)" in printed
    report = json.loads(report_file.read_text())["zero_shot"]
    assert report["n_samples"] == {"arc_easy": 5, "winogrande": 5} and report["limit"] == 5

    model, tokenizer = load_compressed(out)
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "LowRankTensor"
    _, arc_acc, arc_acc_norm = _reference(model, tokenizer, "arc_easy", limit=5)
    _, wino_acc, _ = _reference(model, tokenizer, "winogrande", limit=5)
    assert report["results"]["arc_easy"]["acc,none"] == pytest.approx(arc_acc)
    assert report["results"]["arc_easy"]["acc_norm,none"] == pytest.approx(arc_acc_norm)
    assert report["results"]["winogrande"]["acc,none"] == pytest.approx(wino_acc)
    assert report["average"] == pytest.approx((arc_acc_norm + wino_acc) / 2)
    assert f"{report['average']:.4f}" in printed

    # without --tasks, eval measures perplexity as before, and --output writes it too
    assert main(["eval", str(out), "--seq-len", "32", "--eval-windows", "1", "--output", str(report_file)]) == 0
    perplexity = json.loads(report_file.read_text())["perplexity"]
    assert perplexity["n_tokens"] == 31 and f"{perplexity['ppl']:.3f}" in capsys.readouterr().out


def test_local_records_become_hub_documents():
    (piqa,) = read_documents("piqa", FIXTURES)[:1]
    assert piqa == {"goal": "Keep bread fresh for longer.", "sol1": "Seal it in a bag and store it in a cool cupboard.",
                    "sol2": "Leave it open on a sunny windowsill.", "label": 0}  # fmt: skip
    arc = read_documents("arc_easy", FIXTURES)
    assert arc[0]["choices"] == {
        "text": ["a wooden spoon", "a copper pot", "a plastic cup", "a paper towel"],
        "label": list("ABCD"),
    }
    assert arc[0]["answerKey"] == "B" and arc[3]["choices"]["label"] == list("ABCDE") and arc[3]["answerKey"] == "C"
    assert read_documents("boolq", FIXTURES)[1]["label"] == 0 and read_documents("boolq", FIXTURES)[0]["label"] == 1
    assert read_documents("hellaswag", FIXTURES)[1]["label"] == "1"  # the hub's string label
    assert read_documents("winogrande", FIXTURES)[0]["answer"] == "1"


def test_local_config_keeps_the_stock_prompts_and_only_the_evaluated_split():
    arc = local_task_config("arc_easy", FIXTURES)
    assert arc["doc_to_text"] == "Question: {{question}}\nAnswer:" and arc["doc_to_choice"] == "{{choices.text}}"
    assert (arc["test_split"], arc["validation_split"], arc["training_split"]) == ("test", None, None)
    assert arc["dataset_path"].endswith("ARC-Easy-Test.reconstructed.jsonl")
    hellaswag = local_task_config("hellaswag", FIXTURES)
    assert callable(hellaswag["process_docs"]) and hellaswag["validation_split"] == "validation"
    assert hellaswag["test_split"] is None and list(hellaswag["custom_dataset"]()) == ["validation"]
    assert [m["metric"] for m in local_task_config("boolq", FIXTURES)["metric_list"]] == ["acc"]


def test_where_each_task_reads_its_documents(tmp_path, monkeypatch):
    monkeypatch.setenv("SPADI_AO_DATA", str(tmp_path))  # no zeroshot/ folder there: lm-eval downloads
    specs, sources = task_specs(["piqa", "lambada_openai"])
    assert specs == ["piqa", "lambada_openai"] and sources["piqa"].startswith("lm-eval")
    (tmp_path / "zeroshot").symlink_to(FIXTURES)  # the default folder holds the files: read locally
    specs, sources = task_specs(["piqa", "lambada_openai"])
    assert specs[0]["task"] == "piqa" and specs[1] == "lambada_openai"
    assert sources["piqa"] == str(tmp_path / "zeroshot" / "piqa" / "valid.jsonl")
    with pytest.raises(PipelineError, match=r"task 'hellaswag': missing .*hellaswag_val.jsonl"):
        task_specs(["hellaswag"], data_dir=tmp_path / "nowhere")


def test_malformed_local_files_are_clear_errors(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(PipelineError, match="has 2 labels for 1 records"):
        read_documents("piqa", tmp_path)
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "dev.jsonl").write_text(json.dumps({"question": "q", "passage": "p"}) + "\n")
    with pytest.raises(
        PipelineError, match=r"task 'boolq': a record of .* does not fit the format \(KeyError\('answer'\)\)"
    ):
        read_documents("boolq", tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": []}, "at least one"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_zero_shot_argument_errors(tiny_llama, tiny_tokenizer, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        zero_shot(tiny_llama, tiny_tokenizer, **{"tasks": ["piqa"], "data_dir": FIXTURES, **kwargs})


def test_cli_task_flags_need_tasks(capsys):
    assert main(["eval", "--limit", "3"]) == 2
    assert "--limit and --data-dir apply to --tasks" in capsys.readouterr().err


def test_without_lm_eval_the_package_imports_and_zero_shot_says_what_to_install(
    tiny_llama, tiny_tokenizer, monkeypatch
):
    code = "import sys; sys.modules['lm_eval'] = None; import spadi_ao.pipeline, spadi_ao.cli"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(PipelineError, match=r"pip install \"spadi-ao\[eval\]\""):
        zero_shot(tiny_llama, tiny_tokenizer, ["piqa"], data_dir=FIXTURES)
