"""``spadi-ao --help``: answered without importing torch, every option explained with its default shown."""

import argparse
import subprocess
import sys

from models import tiny_llama, token_batches

from spadi_ao.allocation import output_sensitivity
from spadi_ao.api import select_linears
from spadi_ao.cli import build_parser

SCRIPT = "import sys; sys.argv = ['/venv/bin/spadi-ao', *sys.argv[1:]]; from spadi_ao.cli import main; sys.exit(main())"


def _imported_modules(*argv: str, script: bool = False) -> set[str]:
    """Modules imported by ``python -m spadi_ao ARGV`` or, with ``script``, as the installed ``spadi-ao``
    script runs it."""
    launch = ["-c", SCRIPT] if script else ["-m", "spadi_ao"]
    result = subprocess.run([sys.executable, "-X", "importtime", *launch, *argv], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: spadi-ao" in result.stdout
    return {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_help_imports_no_heavy_module():
    for argv in (["--help"], ["compress", "--help"], ["eval", "--help"], ["info", "--help"]):
        imported = _imported_modules(*argv)
        assert not {"torch", "transformers", "torchao"} & imported, argv
    assert not {"torch", "transformers", "torchao"} & _imported_modules("--help", script=True)


def test_import_outside_the_command_line_registers_everything():
    code = (
        "import sys, spadi_ao; from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING; assert 'spadi_ao' "
        "in AUTO_QUANTIZER_MAPPING"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_a_help_line_and_shows_its_default():
    parser = build_parser()
    for name, sub in {"": parser, **_subparsers(parser)}.items():
        assert sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.dest} has no help line"
    text = _subparsers(parser)["compress"].format_help()
    assert "(default: procrustes)" in text and "toward their diagonal (default: 0.3)" in " ".join(text.split())


def test_sensitivity_pass_shows_progress(capsys):
    model = tiny_llama()
    output_sensitivity(model, select_linears(model), token_batches(2, 8), progress=True)
    assert "loss sensitivity" in capsys.readouterr().err
