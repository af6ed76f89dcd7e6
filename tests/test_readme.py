"""The README's Python snippets run as written, on a tiny random model in place of the embedded one."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

import spadi_ao.pipeline
from spadi_ao.pipeline import load_text, split_text

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_snippets_run(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT / "tutorials"))
    try:
        from _setup import _tiny_model_and_tokenizer
    finally:
        sys.path.remove(str(ROOT / "tutorials"))
    calibration_text, _ = split_text(load_text("stdlib"))
    monkeypatch.setattr(
        spadi_ao.pipeline, "load_model", lambda *args, **kwargs: _tiny_model_and_tokenizer(calibration_text)
    )
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    reloaded, model = namespace["reloaded"], namespace["model"]
    ids = torch.arange(32).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert isinstance(namespace["other"].model.layers[0].mlp.down_proj.weight, spadi_ao.DictionaryTensor)
