"""Every tutorial runs end to end with --tiny (same code, tiny random Llama) in a fresh process."""

import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"

# Expected lines prove the story ran to its end; Inductor codegen itself is covered by test_compose, so the
# compile tutorial uses aot_eager here to skip two C++ builds.
CASES = {
    "01_one_line_transform.py": ([], "perplexity on held-out stdlib text"),
    "02_compile_deploy.py": (["--backend", "aot_eager", "--new-tokens", "6"], "cospadi 0.3:"),
    "03_quantize_and_save.py": ([], "save_pretrained / from_pretrained: reloaded, logits bit-identical"),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_tutorial_runs_with_tiny_model(script, tmp_path):
    extra, expected = CASES[script]
    result = subprocess.run(
        [sys.executable, str(TUTORIALS / script), "--tiny", *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout
