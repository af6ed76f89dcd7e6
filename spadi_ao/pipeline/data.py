"""Text sources for calibration and evaluation, and the random token windows calibration runs on.

The offline default is the English reference documentation shipped in Python's stdlib
(``pydoc_data.topics``), so calibration works with no dataset download and no third-party text in
the package. WikiText-2 and the zero-shot task files live in a shared data folder next to the
checkout (or wherever ``$SPADI_AO_DATA`` points), never inside the package.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import PreTrainedTokenizerBase

from spadi_ao.pipeline import PipelineError

__all__ = [
    "load_text",
    "split_text",
    "encode_text",
    "calibration_batches",
    "mix_calibration",
    "data_root",
    "zeroshot_data_dir",
]

DATA_ENV = "SPADI_AO_DATA"
STDLIB_SOURCE = "stdlib"
WIKITEXT_FILES = {
    "wikitext2-test": Path("wikitext-2-raw") / "wiki.test.joined.txt",
    "wikitext2-valid": Path("wikitext-2") / "wiki.valid.tokens",
}
TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
DOCUMENT_SEPARATOR = "\n\n"


def data_root() -> Optional[Path]:
    """The data folder the user points at with ``$SPADI_AO_DATA`` (None when unset): spadi-ao ships no data."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else None


def zeroshot_data_dir() -> Optional[Path]:
    """Default folder of the local zero-shot task files (piqa/, arc/, hellaswag/, winogrande/, boolq/)."""
    root = data_root()
    return None if root is None else root / "zeroshot"


def load_text(source: str | None = None) -> str:
    """Text named by ``source``: None/"stdlib" (Python's pydoc topics, sorted by topic), "wikitext2-test",
    "wikitext2-valid", "hf:NAME[:CONFIG[:SPLIT[:FIELD]]]", a text file, or a folder of *.txt/*.raw/*.tokens."""
    if source is None or source == STDLIB_SOURCE:
        from pydoc_data.topics import topics

        text = DOCUMENT_SEPARATOR.join(topics[key] for key in sorted(topics))
    elif source in WIKITEXT_FILES:
        root = data_root()
        if root is None:
            raise PipelineError(
                f"text source {source!r}: set {DATA_ENV} to the folder holding {WIKITEXT_FILES[source].parent}/ "
                "(spadi-ao ships no third-party text)"
            )
        path = root / WIKITEXT_FILES[source]
        if not path.is_file():
            raise PipelineError(
                f"text source {source!r}: {path} not found; set {DATA_ENV} to the folder holding "
                f"{WIKITEXT_FILES[source].parent}/ (shared data is not shipped with spadi-ao)"
            )
        text = path.read_text(encoding="utf-8")
    elif source.startswith("hf:"):
        text = _load_hf_dataset(source)
    else:
        text = _load_path(source)
    if not text.strip():
        raise PipelineError(f"text source {source!r} is empty")
    return text


def _load_path(source: str) -> str:
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise PipelineError(f"text source {source!r}: folder has no {'/'.join(TEXT_SUFFIXES)} files")
        return DOCUMENT_SEPARATOR.join(p.read_text(encoding="utf-8") for p in files)
    raise PipelineError(
        f"text source {source!r} is not a file, a folder, {STDLIB_SOURCE!r}, "
        f"{' / '.join(map(repr, WIKITEXT_FILES))}, nor hf:NAME[:CONFIG[:SPLIT[:FIELD]]]"
    )


def _load_hf_dataset(source: str) -> str:
    """Rows of one text field of a Hugging Face dataset split, joined like the GPTQ WikiText-2 loader."""
    parts = source[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 4:
        raise PipelineError(f"text source {source!r}: expected hf:NAME[:CONFIG[:SPLIT[:FIELD]]]")
    if importlib.util.find_spec("datasets") is None:
        raise PipelineError(f"text source {source!r} needs the datasets package: pip install datasets")
    import datasets

    name, config, split, field = (parts + [None, None, None])[:4]
    rows = datasets.load_dataset(name, config or None, split=split or "test")
    return DOCUMENT_SEPARATOR.join(rows[field or "text"])


def split_text(text: str, eval_fraction: float = 0.1) -> tuple[str, str]:
    """Split ``text`` into (calibration, evaluation) at a document boundary, holding out the end.

    Documents are blocks separated by blank lines (single line breaks if there is no blank line). The cut
    is the boundary closest to ``(1 - eval_fraction) * len(text)`` characters and the calibration part is
    everything before it. The evaluation part is the documents after it *less every one that occurs
    verbatim in the calibration part* (reference texts repeat sections: pydoc's topics do), joined by
    the separator: a held-out score then measures text the calibration never saw.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise PipelineError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    paragraphs = re.search(r"\n\s*\n", text) is not None
    boundaries = list(re.finditer(r"\n\s*\n" if paragraphs else r"\n", text))
    boundaries = [b for b in boundaries if b.start() > 0 and b.end() < len(text)]
    if not boundaries:
        raise PipelineError("split_text needs at least two lines or paragraphs of text")
    target = (1.0 - eval_fraction) * len(text)
    cut = min(boundaries, key=lambda b: abs(b.start() - target))
    calibration = text[: cut.start()]
    documents = re.split(r"\n\s*\n" if paragraphs else r"\n", text[cut.end() :])
    held_out = [document for document in documents if document.strip() and document.strip() not in calibration]
    if not held_out:
        raise PipelineError("split_text: every document after the cut also occurs in the calibration part")
    return calibration, ("\n\n" if paragraphs else "\n").join(held_out)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of a whole corpus in one call, as a 1-D LongTensor (GPTQ convention: special tokens are added
    once, at the start). ``verbose=False`` silences the "longer than the model's maximum" warning: callers
    cut the ids into windows themselves."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase, text: str, n_samples: int, seq_len: int, seed: int = 42
) -> list[torch.Tensor]:
    """``n_samples`` windows of exactly ``seq_len`` tokens at seeded random offsets, each of shape (1, seq_len)."""
    if n_samples < 1:
        raise PipelineError(f"n_samples must be >= 1, got {n_samples}")
    if seq_len < 1:
        raise PipelineError(f"seq_len must be >= 1, got {seq_len}")
    ids = encode_text(tokenizer, text)
    if len(ids) < seq_len:
        raise PipelineError(
            f"calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}; "
            "use a longer text or a shorter seq_len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=generator)
    return [ids[start : start + seq_len].unsqueeze(0) for start in starts.tolist()]


def mix_calibration(
    sources: list[tuple[str, float]],
    tokenizer: PreTrainedTokenizerBase,
    n_samples: int,
    seq_len: int,
    seed: int = 42,
    load: Callable[[str], str] = load_text,
) -> list[torch.Tensor]:
    """Calibration windows from several ``(source, weight)`` pairs, ``n_samples`` in all.

    Each source gets a share of the windows proportional to its weight (largest remainder, ties to the
    earlier source) drawn with seed ``seed + index``; the windows come back grouped by source, in order.
    ``load`` turns a source into its text (default :func:`load_text`; the CLI passes one that keeps
    the stdlib corpus' held-out part out of calibration).
    """
    if not sources:
        raise PipelineError("mix_calibration needs at least one (source, weight) pair")
    weights = [weight for _, weight in sources]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise PipelineError(f"mix_calibration weights must be finite, >= 0 and not all 0, got {weights}")
    if n_samples < 1:
        raise PipelineError(f"n_samples must be >= 1, got {n_samples}")
    batches: list[torch.Tensor] = []
    for index, ((source, _), count) in enumerate(zip(sources, _proportional_counts(weights, n_samples), strict=True)):
        if count:
            batches += calibration_batches(tokenizer, load(source), count, seq_len, seed + index)
    return batches


def _proportional_counts(weights: list[float], total: int) -> list[int]:
    """Integers summing to ``total``, proportional to ``weights`` (the largest-remainder method)."""
    quotas = [total * w / sum(weights) for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
