"""Text sources, the calibration / evaluation split, and calibration windows."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spadi_ao.pipeline import PipelineError, calibration_batches, encode_text, load_text, mix_calibration, split_text
from spadi_ao.pipeline.data import _proportional_counts


def _is_window_of(window: torch.Tensor, ids: torch.Tensor) -> bool:
    return bool((ids.unfold(0, window.numel(), 1) == window.flatten()).all(dim=1).any())


# ------------------------------------------------------------------------------------------------ load_text


def test_stdlib_default_is_sorted_pydoc_topics(stdlib_text):
    from pydoc_data.topics import topics

    assert load_text(None) == stdlib_text
    assert stdlib_text == "\n\n".join(topics[key] for key in sorted(topics))
    assert len(stdlib_text) > 100_000


def test_file_and_folder_sources(tmp_path):
    (tmp_path / "b.tokens").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.raw").write_text("third")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_text(str(tmp_path / "a.txt")) == "first"
    assert load_text(str(tmp_path)) == "first\n\nsecond\n\nthird"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing.txt"), "is not a file"),
        (lambda p: (p / "empty.txt").write_text(" \n ") and str(p / "empty.txt"), "is empty"),
        (lambda p: str(p), "no .txt/.raw/.tokens files"),
        (lambda p: "hf:", "expected hf:NAME"),
        (lambda p: "hf:a:b:c:d:e", "expected hf:NAME"),
    ],
)
def test_bad_sources(tmp_path, make, message):
    with pytest.raises(PipelineError, match=message):
        load_text(make(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_source_without_datasets_says_what_to_install():
    with pytest.raises(PipelineError, match="pip install datasets"):
        load_text("hf:wikitext:wikitext-2-raw-v1")


def test_wikitext_shortcuts_resolve_through_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPADI_AO_DATA", str(tmp_path))
    with pytest.raises(PipelineError, match="SPADI_AO_DATA"):
        load_text("wikitext2-test")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.valid.tokens").write_text(" = Valid = \n")
    assert load_text("wikitext2-valid") == " = Valid = \n"


# ----------------------------------------------------------------------------------------------- split_text


def _documents(text: str) -> list[str]:
    return [document.strip() for document in re.split(r"\n\s*\n", text) if document.strip()]


def test_split_is_deterministic_disjoint_and_near_the_fraction(stdlib_text):
    calib, held_out = split_text(stdlib_text, eval_fraction=0.1)
    assert (calib, held_out) == split_text(stdlib_text, eval_fraction=0.1)
    assert stdlib_text.startswith(calib + "\n")
    tail = stdlib_text[len(calib) :]
    assert all(document in tail for document in _documents(held_out))  # held-out documents come from after the cut
    assert 0.08 < len(held_out) / len(stdlib_text) < 0.11  # a tenth, less the duplicates dropped


def test_no_held_out_document_occurs_in_the_calibration_part(stdlib_text):
    """pydoc's topics repeat sections: without de-duplication dozens of held-out paragraphs were calibration text."""
    calib, held_out = split_text(stdlib_text, eval_fraction=0.1)
    documents = _documents(held_out)
    assert len(documents) > 100
    assert not [document for document in documents if document in calib]
    # everything after the cut that the calibration part does not contain is kept
    tail = stdlib_text[len(calib) :]
    assert documents == [d for d in _documents(tail) if d not in calib]


def test_split_drops_repeated_documents_from_the_held_out_part():
    calib, held_out = split_text("intro\n\nshared section\n\nbody text\n\nshared section\n\nnew ending", 0.4)
    assert calib == "intro\n\nshared section\n\nbody text"
    assert held_out == "new ending"
    with pytest.raises(PipelineError, match="also occurs in the calibration part"):
        split_text("alpha beta\n\nbeta", 0.3)


@given(st.lists(st.text("abc xyz", min_size=1, max_size=20), min_size=2, max_size=30), st.floats(0.05, 0.95))
@settings(max_examples=50, deadline=None)
def test_split_never_overlaps(paragraphs, fraction):
    text = "\n\n".join(paragraphs)
    try:
        calib, held_out = split_text(text, fraction)
    except PipelineError as error:
        assert "also occurs in the calibration part" in str(error)
        return
    assert calib and held_out
    assert text.startswith(calib)
    documents = [d.strip() for d in re.split(r"\n\s*\n", held_out)]
    assert all(d and d not in calib for d in documents)


def test_split_falls_back_to_lines_and_rejects_bad_input():
    assert split_text("one\ntwo\nthree\nfour", 0.5) == ("one\ntwo", "three\nfour")
    with pytest.raises(PipelineError, match="at least two lines"):
        split_text("a single line", 0.1)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(PipelineError, match="eval_fraction must be in"):
            split_text("a\n\nb", bad)


# -------------------------------------------------------------------------------------- calibration windows


def test_calibration_windows_are_seeded_slices(tiny_tokenizer, stdlib_text):
    text = stdlib_text[:20_000]
    ids = encode_text(tiny_tokenizer, text)
    batches = calibration_batches(tiny_tokenizer, text, n_samples=6, seq_len=64, seed=7)
    assert len(batches) == 6
    for window in batches:
        assert window.shape == (1, 64) and window.dtype == torch.long
        assert _is_window_of(window, ids)
    again = calibration_batches(tiny_tokenizer, text, n_samples=6, seq_len=64, seed=7)
    other = calibration_batches(tiny_tokenizer, text, n_samples=6, seq_len=64, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other, strict=True))


def test_calibration_text_exactly_one_window_long(tiny_tokenizer):
    text = "tiny text"
    n = len(encode_text(tiny_tokenizer, text))
    (window,) = calibration_batches(tiny_tokenizer, text, n_samples=1, seq_len=n)
    assert torch.equal(window[0], encode_text(tiny_tokenizer, text))


def test_calibration_errors(tiny_tokenizer):
    n = len(encode_text(tiny_tokenizer, "too short"))
    with pytest.raises(PipelineError, match=rf"has {n} tokens, fewer than seq_len={n + 1}"):
        calibration_batches(tiny_tokenizer, "too short", n_samples=1, seq_len=n + 1)
    with pytest.raises(PipelineError, match="n_samples must be >= 1"):
        calibration_batches(tiny_tokenizer, "text", n_samples=0, seq_len=1)
    with pytest.raises(PipelineError, match="seq_len must be >= 1"):
        calibration_batches(tiny_tokenizer, "text", n_samples=1, seq_len=0)


# ----------------------------------------------------------------------------------------------------- mixing


@pytest.mark.parametrize(
    "weights, total, expected",
    [([3, 1], 8, [6, 2]), ([1, 1, 1], 10, [4, 3, 3]), ([0, 2], 5, [0, 5]), ([0.2, 0.3, 0.5], 7, [1, 2, 4])],
)
def test_proportional_counts(weights, total, expected):
    assert _proportional_counts(weights, total) == expected


def test_mix_draws_proportional_windows_from_each_source(tiny_tokenizer, stdlib_text, tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(stdlib_text[:15_000])
    second.write_text(stdlib_text[-15_000:])
    sources = [(str(first), 3.0), (str(second), 1.0)]
    batches = mix_calibration(sources, tiny_tokenizer, n_samples=8, seq_len=32, seed=1)
    first_ids, second_ids = (
        encode_text(tiny_tokenizer, first.read_text()),
        encode_text(tiny_tokenizer, second.read_text()),
    )
    assert [_is_window_of(b, first_ids) for b in batches] == [True] * 6 + [False] * 2
    assert all(_is_window_of(b, second_ids) for b in batches[6:])
    again = mix_calibration(sources, tiny_tokenizer, n_samples=8, seq_len=32, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_mix_rejects_bad_weights(tiny_tokenizer):
    for sources in ([], [("stdlib", 0.0)], [("stdlib", -1.0)], [("stdlib", float("nan"))]):
        with pytest.raises(PipelineError, match="mix_calibration"):
            mix_calibration(sources, tiny_tokenizer, n_samples=2, seq_len=8)
