import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from deltacome_ao.allocate import PAPER_SCHEDULE, allocate, bands_cost_bits, budget_bits, vector_cost_bits
from deltacome_ao.mixed_precision_delta_tensor import BudgetTooSmallError, MixedPrecisionDeltaTensor

SCHEDULES = [PAPER_SCHEDULE, ((2, None),), ((3, None),), ((16, None),), ((8, 4), (4, 8), (2, None))]


@settings(max_examples=300, deadline=None)
@given(
    m=st.integers(1, 20000),
    n=st.integers(1, 20000),
    alpha=st.sampled_from([1 / 8, 1 / 16, 1 / 22, 1 / 32, 0.3]),
    group=st.sampled_from([32, 64, 128]),
    schedule=st.sampled_from(SCHEDULES),
)
def test_budget_never_exceeded(m, n, alpha, group, schedule):
    bands = allocate(m, n, alpha, schedule, group)
    assert bands_cost_bits(bands, m, n, group) <= budget_bits(m, n, alpha)
    assert sum(b.count for b in bands) <= min(m, n)
    # greedy: nothing more of the cheapest width would still fit (unless the rank is exhausted)
    if sum(b.count for b in bands) < min(m, n):
        left = budget_bits(m, n, alpha) - bands_cost_bits(bands, m, n, group)
        assert left < vector_cost_bits(schedule[-1][0], m, n, group)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(40, 400), n=st.integers(40, 400), alpha=st.sampled_from([1 / 8, 1 / 16]), seed=st.integers(0, 5))
def test_stored_bytes_match_cost_model_and_budget(m, n, alpha, seed):
    """The bytes really stored by the tensor equal the cost model, and stay within alpha."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g)
    ft = base + 0.01 * torch.randn(m, n, generator=g)
    try:
        t = MixedPrecisionDeltaTensor.from_hp(ft, base, alpha=alpha, group_size=32)
    except BudgetTooSmallError:
        assert not allocate(m, n, alpha, PAPER_SCHEDULE, 32)
        return
    assert 8 * t.delta_nbytes() == bands_cost_bits(t.bands, m, n, 32)
    assert t.bits_per_param() <= 16 * alpha


def test_paper_schedule_on_llama_shapes():
    """4096x4096 at alpha=1/16: 2x8 + 32x3 bits, then 2-bit vectors until the budget (~850 with
    scales counted; the paper, not counting scales, used 968)."""
    bands = allocate(4096, 4096, 1 / 16)
    assert [(b.bits, b.count) for b in bands[:2]] == [(8, 2), (3, 32)]
    assert bands[2].bits == 2 and 800 < bands[2].count < 968
    # GQA k/v projection: the same alpha gives proportionally fewer vectors, not an overspend
    kv = allocate(1024, 4096, 1 / 16)
    assert bands_cost_bits(kv, 1024, 4096, 128) <= budget_bits(1024, 4096, 1 / 16)
    assert sum(b.count for b in kv) < sum(b.count for b in bands)


def test_budget_too_small_is_a_clear_error():
    base = torch.randn(64, 64)
    with pytest.raises(BudgetTooSmallError, match="alpha=0.001.*64x64.*raise alpha"):
        MixedPrecisionDeltaTensor.from_hp(base + 0.1, base, alpha=0.001, group_size=32, name="q_proj")


def test_explicit_bands_are_used_and_truncated_to_rank():
    base = torch.randn(50, 40)
    ft = base + torch.randn(50, 3) @ torch.randn(3, 40) * 0.01
    t = MixedPrecisionDeltaTensor.from_hp(ft, base, bands=[(8, 2), (4, 10)], group_size=16)
    assert [(b.bits, b.count) for b in t.bands] == [(8, 2), (4, 1)]
    assert math.isclose(t.bits_per_param(), 8 * t.delta_nbytes() / (50 * 40))
