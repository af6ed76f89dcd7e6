"""Bad inputs to ``sparsify_dictionary_``: each raises a message naming the parameter and the fix, before any weight
changes. The same table is docs/bad_inputs.md: ``python tests/test_bad_inputs.py`` rewrites it, and
:func:`test_doc_is_current` fails when the two differ.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parent)]  # as a script: this checkout's spadi_ao

from models import tiny_llama  # noqa: E402

from spadi_ao import DictionaryConfig, LowRankConfig, sparsify_dictionary_  # noqa: E402
from spadi_ao.tensor import is_compressed_weight  # noqa: E402

DOC = Path(__file__).parents[1] / "docs" / "bad_inputs.md"
CONFIG = DictionaryConfig(compression_ratio=0.3)
IDS = torch.arange(1, 9).unsqueeze(0)  # (1, 8) valid ids of the tiny vocabulary (256)


def _compress(model: nn.Module, config=CONFIG, calibration=IDS, **kwargs) -> None:
    sparsify_dictionary_(model, config, calibration=calibration, progress=False, **kwargs)


def _compressed_llama() -> nn.Module:
    model = tiny_llama()
    _compress(model)
    return model


def _nan_llama() -> nn.Module:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    return model


def _gpt2() -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).eval()


@dataclass(frozen=True)
class Case:
    input: str
    call: Callable[[nn.Module], None]
    error: type[Exception]
    model: Callable[[], nn.Module] = tiny_llama


MASK_2 = {"input_ids": IDS, "attention_mask": torch.full((1, 8), 2)}
PADDED = {"input_ids": IDS, "attention_mask": torch.tensor([[1] * 6 + [0] * 2])}
CASES = [
    Case('calibration="def f(): pass" (text)', lambda m: _compress(m, calibration="def f(): pass"), TypeError),
    Case('calibration=["text a", "text b"]', lambda m: _compress(m, calibration=["text a", "text b"]), TypeError),
    Case("calibration=42", lambda m: _compress(m, calibration=42), TypeError),
    Case("calibration=[[1, 2, 3]] (lists of ids)", lambda m: _compress(m, calibration=[[1, 2, 3]]), TypeError),
    Case(
        'calibration={"input_ids": [[1, 2, 3]]} (tokenizer output without return_tensors="pt")',
        lambda m: _compress(m, calibration={"input_ids": [[1, 2, 3]]}),
        TypeError,
    ),
    Case("float ids: torch.rand(1, 8)", lambda m: _compress(m, calibration=torch.rand(1, 8)), ValueError),
    Case(
        "bool ids: torch.ones(1, 8, dtype=torch.bool)",
        lambda m: _compress(m, calibration=torch.ones(1, 8, dtype=torch.bool)),
        ValueError,
    ),
    Case(
        "3-D ids: torch.zeros(1, 2, 8, dtype=torch.long)",
        lambda m: _compress(m, calibration=torch.zeros(1, 2, 8, dtype=torch.long)),
        ValueError,
    ),
    Case(
        "ids >= vocab size: torch.full((1, 8), 300)",
        lambda m: _compress(m, calibration=torch.full((1, 8), 300)),
        ValueError,
    ),
    Case(
        "negative ids: torch.full((1, 8), -1)", lambda m: _compress(m, calibration=torch.full((1, 8), -1)), ValueError
    ),
    Case(
        "sequence longer than max_position_embeddings (300 > 256)",
        lambda m: _compress(m, calibration=torch.zeros(1, 300, dtype=torch.long)),
        ValueError,
    ),
    Case("calibration=[] (empty)", lambda m: _compress(m, calibration=[]), ValueError),
    Case(
        "empty sequence: torch.zeros(1, 0, dtype=torch.long)",
        lambda m: _compress(m, calibration=torch.zeros(1, 0, dtype=torch.long)),
        ValueError,
    ),
    Case(
        'mapping without input_ids: {"attention_mask": ...}',
        lambda m: _compress(m, calibration={"attention_mask": torch.ones(1, 8)}),
        ValueError,
    ),
    Case(
        "attention_mask of another shape than input_ids",
        lambda m: _compress(m, calibration={"input_ids": IDS, "attention_mask": torch.ones(1, 5, dtype=torch.long)}),
        ValueError,
    ),
    Case("attention_mask holding 2", lambda m: _compress(m, calibration=MASK_2), ValueError),
    Case(
        "float attention_mask (0.5)",
        lambda m: _compress(m, calibration={"input_ids": IDS, "attention_mask": torch.full((1, 8), 0.5)}),
        ValueError,
    ),
    Case(
        "attention_mask of zeros only",
        lambda m: _compress(m, calibration={"input_ids": IDS, "attention_mask": torch.zeros(1, 8, dtype=torch.long)}),
        ValueError,
    ),
    Case(
        "sequential=True with a padded batch", lambda m: _compress(m, calibration=[PADDED], sequential=True), ValueError
    ),
    Case(
        'layer_overrides={r"mlp\\.up_projection$": ...} (matches no layer)',
        lambda m: _compress(
            m, DictionaryConfig(compression_ratio=0.3, layer_overrides={r"mlp\.up_projection$": {"rho": 3.0}})
        ),
        ValueError,
    ),
    Case(
        "GPT-2 (transformers Conv1D projections)",
        lambda m: _compress(m, calibration=torch.arange(8)),
        ValueError,
        _gpt2,
    ),
    Case("filter_fn selecting nothing", lambda m: _compress(m, filter_fn=lambda module, name: False), ValueError),
    Case(
        "DictionaryConfig(compression_ratio=1.5)",
        lambda m: _compress(m, DictionaryConfig(compression_ratio=1.5)),
        ValueError,
    ),
    Case(
        "DictionaryConfig(rho=0.5)",
        lambda m: _compress(m, DictionaryConfig(compression_ratio=0.3, rho=0.5)),
        ValueError,
    ),
    Case(
        "DictionaryConfig(gram_shrinkage=2.0)",
        lambda m: _compress(m, DictionaryConfig(compression_ratio=0.3, gram_shrinkage=2.0)),
        ValueError,
    ),
    Case(
        'DictionaryConfig(allocation="greedy")',
        lambda m: _compress(m, DictionaryConfig(compression_ratio=0.3, allocation="greedy")),
        ValueError,
    ),
    Case('config={"compression_ratio": 0.3} (a dict)', lambda m: _compress(m, {"compression_ratio": 0.3}), TypeError),
    Case('propagate="sideways"', lambda m: _compress(m, propagate="sideways", sequential=True), ValueError),
    Case('device="cpu" without sequential=True', lambda m: _compress(m, device="cpu"), ValueError),
    Case("a model compressed already", lambda m: _compress(m), ValueError, _compressed_llama),
    Case("a NaN in a weight", lambda m: _compress(m), ValueError, _nan_llama),
    Case(
        "grouping='paper' (pairs of blocks) with sequential=True",
        lambda m: _compress(m, DictionaryConfig(compression_ratio=0.3, grouping="paper"), sequential=True),
        ValueError,
    ),
    Case(
        "sensitivity= missing layers",
        lambda m: _compress(m, DictionaryConfig(compression_ratio=0.3, allocation="knapsack"), sensitivity={}),
        ValueError,
    ),
    Case(
        "LowRankConfig(compression_ratio=0.0)", lambda m: _compress(m, LowRankConfig(compression_ratio=0.0)), ValueError
    ),
]


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (value.dequantize() if is_compressed_weight(value) else value.detach().clone()).nan_to_num(12345.0)
        for name, value in model.state_dict().items()
    }


def run_case(case: Case) -> tuple[Exception, bool]:
    """The exception the case raises and whether the model's weights are exactly as before."""
    model = case.model()
    before = _snapshot(model)
    try:
        case.call(model)
    except Exception as exc:  # the table records whatever is raised; the test checks its type
        raised = exc
    else:
        raise AssertionError(f"{case.input}: nothing raised")
    after = _snapshot(model)
    untouched = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return raised, untouched


@pytest.mark.parametrize("case", CASES, ids=[case.input for case in CASES])
def test_bad_input_raises_and_leaves_the_model_untouched(case):
    raised, untouched = run_case(case)
    assert type(raised) is case.error, f"{case.input}: {type(raised).__name__}: {raised}"
    assert untouched


def render() -> str:
    lines = [
        "# Bad inputs tried",
        "",
        "Every row is a call of `sparsify_dictionary_` on a tiny random Llama (vocabulary 256, 256 positions) unless",
        "it says otherwise. Generated by `python tests/test_bad_inputs.py` from the table that",
        '`tests/test_bad_inputs.py` runs; the test fails when this file is out of date. "Model untouched" compares',
        "every weight before and after the call.",
        "",
        "| # | input | error raised | model untouched |",
        "|---|---|---|---|",
    ]
    for number, case in enumerate(CASES, 1):
        raised, untouched = run_case(case)
        message = str(raised).replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {number} | {case.input.replace('|', chr(92) + '|')} | `{type(raised).__name__}`: {message} | "
            f"{'yes' if untouched else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def test_doc_is_current():
    assert DOC.read_text() == render(), "docs/bad_inputs.md is stale: run python tests/test_bad_inputs.py"


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    DOC.write_text(render())
    print(f"wrote {DOC}")
