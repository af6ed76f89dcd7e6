"""Zero-shot accuracy through lm-eval-harness on the in-memory model, offline from local task files.

lm-eval's stock tasks fetch their datasets from the Hugging Face hub. For the tasks compression papers
report, the files of the original releases (a local data folder) are read instead and mapped onto the
fields of the hub datasets, so lm-eval applies its own prompts (``doc_to_text``, ``doc_to_choice``,
``doc_to_target``, ``process_docs``) and metrics unchanged: only where the documents come from differs.
Any other task name goes to lm-eval as it is. lm-eval is imported on first use, so the package works
without it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spadi_ao.pipeline import PipelineError
from spadi_ao.pipeline.data import zeroshot_data_dir

__all__ = [
    "LOCAL_TASKS",
    "LocalTask",
    "ZeroShotResult",
    "local_task_config",
    "read_documents",
    "task_specs",
    "zero_shot",
]

INSTALL_HINT = 'pip install "spadi-ao[eval]" (lm-eval)'


@dataclass(frozen=True)
class LocalTask:
    """Where a stock task's documents lie in a local data folder, and how one record becomes a hub document."""

    stock_config: str
    """The stock task's YAML, relative to ``lm_eval/tasks``."""
    records: str
    """JSON lines, relative to the data folder: the split the stock task evaluates."""
    to_stock: Callable[[dict[str, Any]], dict[str, Any]]
    """One local record -> the fields the stock task's templates read."""
    labels: str | None = None
    """One label per line, joined onto the records as ``label`` (PIQA's release keeps its labels apart)."""

    def paths(self, data_dir: Path) -> list[Path]:
        return [data_dir / name for name in (self.records, self.labels) if name is not None]


def _piqa(record: dict[str, Any]) -> dict[str, Any]:
    return {"goal": record["goal"], "sol1": record["sol1"], "sol2": record["sol2"], "label": int(record["label"])}


def _arc(record: dict[str, Any]) -> dict[str, Any]:
    """The reconstructed files list the choice texts and the gold index; the hub nests texts and letters."""
    letters = [chr(ord("A") + i) for i in range(len(record["choices"]))]
    return {
        "question": record["question"],
        "choices": {"text": list(record["choices"]), "label": letters},
        "answerKey": letters[int(record["gold"])],
    }


def _hellaswag(record: dict[str, Any]) -> dict[str, Any]:
    """The release's own field names, which the stock ``process_docs`` reads; the hub stores the label as text."""
    fields = ("activity_label", "ctx_a", "ctx_b", "endings")
    return {**{name: record[name] for name in fields}, "label": str(record["label"])}


def _winogrande(record: dict[str, Any]) -> dict[str, Any]:
    fields = ("sentence", "option1", "option2")
    return {**{name: record[name] for name in fields}, "answer": str(record["answer"])}


def _boolq(record: dict[str, Any]) -> dict[str, Any]:
    """SuperGLUE's BoolQ, which the stock task reads, calls the boolean answer ``label`` (0 = no, 1 = yes)."""
    return {"question": record["question"], "passage": record["passage"], "label": int(record["answer"])}


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa/piqa.yaml", "piqa/valid.jsonl", _piqa, labels="piqa/valid-labels.lst"),
    "arc_easy": LocalTask("arc/arc_easy.yaml", "arc/ARC-Easy-Test.reconstructed.jsonl", _arc),
    "arc_challenge": LocalTask("arc/arc_challenge.yaml", "arc/ARC-Challenge-Test.reconstructed.jsonl", _arc),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", "hellaswag/hellaswag_val.jsonl", _hellaswag),
    "winogrande": LocalTask("winogrande/default.yaml", "winogrande/dev.jsonl", _winogrande),
    "boolq": LocalTask("super_glue/boolq/default.yaml", "boolq/dev.jsonl", _boolq),
}
"""Stock lm-eval tasks that can read their documents from a local data folder (``--data-dir``)."""


def _check_files(task: str, data_dir: Path) -> None:
    missing = [str(path) for path in LOCAL_TASKS[task].paths(data_dir) if not path.is_file()]
    if missing:
        raise PipelineError(f"task {task!r}: missing {', '.join(missing)} (data dir {data_dir})")


def read_documents(task: str, data_dir: str | Path) -> list[dict[str, Any]]:
    """The local records of ``task`` as documents of the stock task's hub dataset, in file order."""
    spec = LOCAL_TASKS[task]
    data_dir = Path(data_dir)
    _check_files(task, data_dir)
    with (data_dir / spec.records).open(encoding="utf-8") as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    if spec.labels is not None:
        labels = (data_dir / spec.labels).read_text(encoding="utf-8").split()
        if len(labels) != len(records):
            raise PipelineError(
                f"task {task!r}: {data_dir / spec.labels} has {len(labels)} labels for {len(records)} records"
            )
        records = [{**record, "label": label} for record, label in zip(records, labels, strict=True)]
    try:
        return [spec.to_stock(record) for record in records]
    except (KeyError, ValueError, IndexError) as error:
        raise PipelineError(
            f"task {task!r}: a record of {data_dir / spec.records} does not fit the format ({error!r})"
        ) from error


@dataclass(frozen=True)
class _LocalDocuments:
    """lm-eval's ``custom_dataset`` hook: the local documents as the one split the stock task evaluates."""

    task: str
    split: str
    data_dir: Path

    def __call__(self, **_metadata: Any) -> Any:
        import datasets

        documents = datasets.Dataset.from_list(read_documents(self.task, self.data_dir))
        return datasets.DatasetDict({self.split: documents})


def local_task_config(task: str, data_dir: str | Path) -> dict[str, Any]:
    """The stock config of ``task`` (one of :data:`LOCAL_TASKS`) with its documents read from ``data_dir``.

    Prompts, choices, targets, document processing and metrics stay the stock task's; the hub dataset is
    replaced by the local files, and only the split they hold (the one the stock task evaluates) is kept,
    which leaves zero-shot evaluation as it was.
    """
    # lm-eval's own loader: it resolves the YAML's !function entries (e.g. HellaSwag's process_docs).
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    data_dir = Path(data_dir)
    spec = LOCAL_TASKS[task]
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / spec.stock_config, resolve_func=True)
    for key in ("tag", "group", "dataset_kwargs"):
        config.pop(key, None)
    evaluated = "test_split" if config.get("test_split") else "validation_split"
    unused = {
        name: None
        for name in ("training_split", "validation_split", "test_split", "fewshot_split")
        if name != evaluated
    }
    return {
        **config,
        **unused,
        "dataset_path": str(data_dir / spec.records),
        "dataset_name": None,
        "custom_dataset": _LocalDocuments(task, config[evaluated], data_dir),
    }


def task_specs(
    tasks: Sequence[str], data_dir: str | Path | None = None
) -> tuple[list[str | dict[str, Any]], dict[str, str]]:
    """What to hand lm-eval for each task name, and where each task's documents come from.

    A task of :data:`LOCAL_TASKS` reads ``data_dir`` (its files must be there) or, without one, the default
    zero-shot folder (``$SPADI_AO_DATA/zeroshot``) when its files are there; otherwise, like every other
    task name, it goes to lm-eval unchanged, which downloads its dataset.
    """
    root = Path(data_dir) if data_dir is not None else zeroshot_data_dir()
    specs: list[str | dict[str, Any]] = []
    sources: dict[str, str] = {}
    for task in tasks:
        local = LOCAL_TASKS.get(task)
        if local is not None and data_dir is not None:
            _check_files(task, root)
        if local is not None and root is not None and all(path.is_file() for path in local.paths(root)):
            specs.append(local_task_config(task, root))
            sources[task] = str(root / local.records)
        else:
            specs.append(task)
            sources[task] = "lm-eval (its own dataset)"
    return specs, sources


@dataclass
class ZeroShotResult:
    """lm-eval's results for the requested tasks, its table, and the averages papers report.

    ``average`` takes ``acc_norm`` where the task reports it (PIQA, ARC, HellaSwag) and ``acc`` otherwise
    (WinoGrande, BoolQ), a common choice in compression papers; ``average_acc`` averages plain ``acc``.
    ``reported`` names the metric each task contributes.
    """

    results: dict[str, dict[str, Any]]
    table: str
    average: float | None
    average_acc: float | None
    reported: dict[str, str]
    n_samples: dict[str, int]
    sources: dict[str, str]
    versions: dict[str, Any]
    limit: int | None
    samples: dict[str, list[dict[str, Any]]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-document samples, JSON-ready."""
        report = asdict(self)
        report.pop("samples")
        return json.loads(json.dumps(report, default=str))


def _summarise(
    output: dict[str, Any], tasks: Sequence[str], sources: dict[str, str], limit: int | None
) -> ZeroShotResult:
    from lm_eval.utils import make_table

    results = output["results"]
    reported: dict[str, str] = {}
    for task in tasks:
        metrics = results.get(task, {})
        metric = next((name for name in ("acc_norm", "acc") if f"{name},none" in metrics), None)
        if metric is not None:
            reported[task] = metric
    accs = [results[task]["acc,none"] for task in tasks if "acc,none" in results.get(task, {})]
    return ZeroShotResult(
        results=results,
        table=make_table(output) + (make_table(output, "groups") if output.get("groups") else ""),
        average=statistics.fmean(results[t][f"{m},none"] for t, m in reported.items()) if reported else None,
        average_acc=statistics.fmean(accs) if accs else None,
        reported=reported,
        n_samples={task: counts["effective"] for task, counts in output.get("n-samples", {}).items()},
        sources=sources,
        versions=output.get("versions", {}),
        limit=limit,
        samples=output.get("samples"),
    )


def zero_shot(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
) -> ZeroShotResult:
    """Zero-shot evaluation of ``model`` by lm-eval-harness: its ``HFLM`` wraps the model object as it is
    (no reload by name), and ``simple_evaluate`` runs ``tasks`` on the first ``limit`` documents of each.

    See :func:`task_specs` for where the documents come from. ``log_samples`` keeps lm-eval's
    per-document records (requests, log-likelihoods) in ``result.samples``.
    """
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise PipelineError("tasks must name at least one lm-eval task")
    if limit is not None and limit < 1:
        raise PipelineError(f"limit must be >= 1 or None, got {limit}")
    if batch_size < 1:
        raise PipelineError(f"batch_size must be >= 1, got {batch_size}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise PipelineError(f"zero-shot evaluation runs lm-eval-harness: {INSTALL_HINT}") from error

    specs, sources = task_specs(tasks, data_dir)
    by_name = [spec for spec in specs if isinstance(spec, str)]
    # Indexing every stock task takes seconds; local configs need none of it.
    manager = TaskManager() if by_name else TaskManager(include_defaults=False)
    unknown = [name for name in by_name if name not in manager.all_tasks]
    if unknown:
        raise PipelineError(f"tasks {', '.join(unknown)} are not lm-eval tasks, groups or tags")
    was_training = model.training
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(
            model=lm, tasks=specs, limit=limit, task_manager=manager, log_samples=log_samples
        )
    finally:
        model.train(was_training)
    return _summarise(output, tasks, sources, limit)
