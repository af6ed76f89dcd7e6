import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spadi_ao.budget import dictionary_budget, dictionary_bytes, low_rank_budget, paper_ratio
from spadi_ao.format import bitmask_bytes

REAL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (1024, 4096), (14336, 4096)]


@pytest.mark.parametrize("shape", REAL_SHAPES)
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.4, 0.5])
@pytest.mark.parametrize("element_size", [2, 4])
def test_dictionary_ratio_is_honest_and_tight(shape, ratio, element_size):
    out_features, in_features = shape
    budget = dictionary_budget(out_features, in_features, ratio, 2.0, element_size)
    stored = (
        budget.k * in_features * element_size
        + out_features * budget.s * element_size
        + out_features * bitmask_bytes(budget.k)
    )
    assert budget.stored_bytes == stored
    assert budget.compression_ratio >= ratio  # never below target
    assert budget.compression_ratio - ratio <= 0.005  # within half a percentage point
    # k is the largest dictionary at rho = 2; leftover bytes only ever add non-zeros
    assert budget.s >= round(budget.k / 2.0)
    assert dictionary_bytes(out_features, in_features, budget.k + 1, round((budget.k + 1) / 2), element_size) > (
        (1 - ratio) * out_features * in_features * element_size
    )


@given(
    out_features=st.integers(8, 3000),
    in_features=st.integers(8, 3000),
    ratio=st.floats(0.05, 0.9),
    rho=st.floats(1.0, 8.0),
)
@settings(max_examples=200, deadline=None)
def test_dictionary_budget_is_maximal(out_features, in_features, ratio, rho):
    try:
        budget = dictionary_budget(out_features, in_features, ratio, rho, 2)
    except ValueError:
        assert dictionary_bytes(out_features, in_features, 1, 1, 2) > (1 - ratio) * out_features * in_features * 2
        return
    allowed = int((1 - ratio) * out_features * in_features * 2)
    assert budget.stored_bytes <= allowed
    assert 1 <= budget.s <= budget.k
    # one more non-zero per column would not fit (unless s is already k)
    if budget.s < budget.k:
        assert dictionary_bytes(out_features, in_features, budget.k, budget.s + 1, 2) > allowed


def test_bitmask_is_cheaper_than_index_lists_at_rho_two():
    budget = dictionary_budget(4096, 4096, 0.3, 2.0, 2)
    bitmask_bits = budget.k  # per output column
    int16_index_bits = 16 * budget.s
    assert int16_index_bits / bitmask_bits == pytest.approx(8.0, rel=0.01)


def test_paper_ratio_ignores_positions():
    budget = dictionary_budget(576, 576, 0.3, 2.0, 2)
    assert budget.paper_ratio == pytest.approx(paper_ratio(576, 576, budget.k, budget.s))
    assert budget.paper_ratio > budget.compression_ratio


@pytest.mark.parametrize("shape", REAL_SHAPES)
def test_low_rank_budget(shape):
    out_features, in_features = shape
    budget = low_rank_budget(out_features, in_features, 0.3, 2)
    assert budget.compression_ratio >= 0.3
    one_more = (budget.rank + 1) * (in_features + out_features) * 2
    assert one_more > 0.7 * out_features * in_features * 2


def test_impossible_budget_raises():
    with pytest.raises(ValueError, match="compression_ratio"):
        dictionary_budget(4, 4, 0.99, 2.0, 2)
    with pytest.raises(ValueError, match="compression_ratio"):
        low_rank_budget(4, 4, 0.9, 2)
