import math

import pytest

from spadi_ao import DictionaryConfig, LowRankConfig


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, math.nan, "0.3", True])
@pytest.mark.parametrize("config_type", [DictionaryConfig, LowRankConfig])
def test_compression_ratio_must_be_in_open_unit_interval(config_type, ratio):
    with pytest.raises(ValueError, match=r"compression_ratio .*\(0, 1\)"):
        config_type(compression_ratio=ratio)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rho": 0.5}, "rho"),
        ({"iterations": -1}, "iterations"),
        ({"power_iterations": 0}, "power_iterations"),
        ({"atoms_per_step": 0}, "atoms_per_step"),
        ({"init": "kmeans"}, "init"),
        ({"damping": -1.0}, "damping"),
        ({"gram_shrinkage": 1.5}, "gram_shrinkage"),
        ({"gram_shrinkage": "often"}, "gram_shrinkage"),
        ({"layer_overrides": {"(": {}}}, "layer_overrides"),
        ({"layer_overrides": {"down": {"bogus": 1}}}, "layer_overrides"),
        ({"layer_overrides": {"down": {"compression_ratio": 2.0}}}, "compression_ratio"),
        (
            {"compression_ratio": 0.95},
            "compression_ratio 0.95 is above the largest of allocation_candidates",
        ),  # knapsack
    ],
)
def test_bad_fields_name_themselves(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DictionaryConfig(**kwargs)


def test_layer_overrides_apply_by_regex():
    config = DictionaryConfig(
        compression_ratio=0.3, layer_overrides={r"down_proj$": {"compression_ratio": 0.2, "rho": 3.0}}
    )
    assert config.for_layer("model.layers.0.mlp.down_proj").compression_ratio == 0.2
    assert config.for_layer("model.layers.0.mlp.down_proj").rho == 3.0
    assert config.for_layer("model.layers.0.mlp.up_proj") is config
