"""Every benchmark runs the way the README runs it: ``python benchmarks/<name>.py ...`` from the repository root.

Run as a script, a benchmark's directory comes first on ``sys.path``, so a benchmark module named like a
package that a dependency imports (``benchmarks/kernels.py`` against the ``kernels`` package transformers
imports) breaks every benchmark that imports that dependency.
"""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(path for path in BENCHMARKS.glob("*.py") if "__main__" in path.read_text())
# Quick modes that finish in seconds: (script, arguments); "{tmp}" is a temporary directory.
QUICK = [
    (
        "layer_latency.py",
        ["--quick", "--tokens", "1", "16", "--budget", "0.01", "--max-wait", "0", "--json", "{tmp}/latency.json"],
    )
]


def _run(arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_no_benchmark_module_shadows_an_installed_package():
    outside = [entry for entry in sys.path if Path(entry or ".").resolve() not in (BENCHMARKS, ROOT)]
    for path in BENCHMARKS.glob("*.py"):
        assert path.stem not in sys.stdlib_module_names, (
            f"benchmarks/{path.name} shadows the standard library's {path.stem}"
        )
        found = importlib.machinery.PathFinder.find_spec(path.stem, outside)
        assert found is None, f"benchmarks/{path.name} shadows {found.origin}: rename it"


def test_every_benchmark_prints_its_help():
    assert {"layer_latency.py", "memory.py", "decode.py"} <= {path.name for path in SCRIPTS}
    children = {
        path.name: subprocess.Popen(
            [sys.executable, str(path.relative_to(ROOT)), "--help"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in SCRIPTS
    }
    for name, child in children.items():
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0 and "usage:" in stdout, f"benchmarks/{name} --help failed:\n{stderr[-2000:]}"


@pytest.mark.parametrize("script, arguments", QUICK)
def test_quick_modes_run(script, arguments, tmp_path):
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    result = _run([f"benchmarks/{script}", *arguments])
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(tmp_path.iterdir()), f"benchmarks/{script} wrote nothing"
