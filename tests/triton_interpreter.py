"""Runs a test file's ``*_interpreted`` tests under the Triton interpreter, in a child pytest.

``TRITON_INTERPRET=1`` takes effect only if it is set before triton is imported, which the parent test
session has already done; a child process is the one clean way to switch it on.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run_interpreted(test_file: str, expected_passed: int = 1) -> None:
    """``test_file -k interpreted`` with ``TRITON_INTERPRET=1``: ``expected_passed`` tests pass, none skips."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-o",
        "addopts=",
        "--noconftest",
        "-p",
        "no:cacheprovider",
        test_file,
        "-k",
        "interpreted",
    ]
    result = subprocess.run(
        command, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"{expected_passed} passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
