"""``import spadi_ao`` needs torch and torchao only; the transformers quantizer registers in either import order."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_import_needs_neither_transformers_nor_accelerate():
    line = _run(
        """
        import sys
        import spadi_ao
        print("transformers" in sys.modules, "accelerate" in sys.modules)
        """
    )
    assert line == "False False"


def test_quantizer_registered_when_transformers_comes_after():
    line = _run(
        """
        import spadi_ao
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
        print("spadi_ao" in AUTO_QUANTIZER_MAPPING, "spadi_ao" in AUTO_QUANTIZATION_CONFIG_MAPPING)
        """
    )
    assert line == "True True"


def test_quantizer_registered_when_transformers_comes_first():
    line = _run(
        """
        import transformers
        import spadi_ao
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        print("spadi_ao" in AUTO_QUANTIZER_MAPPING, spadi_ao.SpadiAoConfig.__name__)
        """
    )
    assert line == "True SpadiAoConfig"
