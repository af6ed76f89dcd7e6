"""The scale benchmark measures the library's peak memory, not its own: the clocks it patches around the
sequential driver keep no Gram alive that the library frees."""

from __future__ import annotations

import importlib.util
import weakref
from pathlib import Path

import torch
from models import tiny_llama, token_batches

import spadi_ao.api
import spadi_ao.layer
import spadi_ao.sequential
from spadi_ao import DictionaryConfig, sparsify_dictionary_
from spadi_ao.calibration import GramCollector

SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
PATCHED = [
    (spadi_ao.api, "solve_weights"),
    (spadi_ao.api, "compress_weight"),
    (spadi_ao.api, "compress_group"),
    (spadi_ao.api, "tabulate_unit"),
    (spadi_ao.sequential, "exchange_layers"),
    (spadi_ao.sequential, "exchange_tables"),
    (spadi_ao.sequential, "blockwise_sensitivity"),
    (spadi_ao.sequential._Blockwise, "survey"),
]


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale_benchmark", SCALE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_clocks_leave_every_handed_over_down_proj_gram_freed_before_its_solve(monkeypatch):
    """A down_proj (more inputs than outputs) is handed its Gram, factors it in place and frees it before the
    solver runs, in the first pass (its table) and in the compress pass alike; under the benchmark's clocks too,
    which still time both passes."""
    for owner, name in PATCHED:  # the clocks patch these for good; monkeypatch puts them back after the test
        monkeypatch.setattr(owner, name, getattr(owner, name))
    scale = _scale_module()
    solve_clock, first_pass_clock = scale.SolveClock(), scale.FirstPassClock()

    model = tiny_llama()
    width = model.config.intermediate_size
    handed: list[weakref.ref] = []
    alive_at_solve: list[bool] = []
    grams, solve = GramCollector.grams, spadi_ao.layer.solve_dictionary

    def recording_grams(self, names, take=False):
        result = grams(self, names, take)
        if take:
            handed.extend(weakref.ref(gram) for gram in result if gram is not None and gram.shape[0] == width)
        return result

    def recording_solve(whitened, *args, **kwargs):
        if whitened.shape[0] == width:
            alive_at_solve.append(any(ref() is not None for ref in handed))
        return solve(whitened, *args, **kwargs)

    monkeypatch.setattr(GramCollector, "grams", recording_grams)
    monkeypatch.setattr(spadi_ao.layer, "solve_dictionary", recording_solve)
    config = DictionaryConfig(compression_ratio=0.3, allocation="knapsack", grouping="inputs")
    with torch.no_grad():
        sparsify_dictionary_(model, config, calibration=token_batches(4, 16), sequential=True, progress=False)

    assert len(handed) == 2 * model.config.num_hidden_layers  # each block's down_proj, in both passes
    assert alive_at_solve == [False] * model.config.num_hidden_layers
    assert all(ref() is None for ref in handed)
    assert solve_clock.seconds > 0 and first_pass_clock.table_seconds > 0 and first_pass_clock.seconds > 0
