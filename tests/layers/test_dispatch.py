import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeify.layers.dispatch import dispatch, expert_capacity


def test_capacity_formula():
    assert expert_capacity(1024, 8, 1.25, 4) == 160
    assert expert_capacity(10, 8, 1.25, 4) == 4  # min_capacity wins
    assert expert_capacity(100, 3, 1.0, 0) == 34  # ceil(33.3)


def test_earlier_tokens_win_and_order_is_grouped_by_expert():
    expert_index = torch.tensor([1, 0, 1, 1, 0, 1, 2])
    d = dispatch(expert_index, num_experts=4, capacity=2)
    assert d.token_index.tolist() == [1, 4, 0, 2, 6]  # expert 0: 1,4; expert 1: 0,2 (3,5 dropped); 2: 6
    assert d.counts == [2, 2, 1, 0]
    assert d.routed.tolist() == [2, 4, 1, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=80), st.integers(0, 10))
def test_dispatch_matches_a_naive_scan(choices, capacity):
    expert_index = torch.tensor(choices)
    d = dispatch(expert_index, 6, capacity)
    kept = {e: [] for e in range(6)}
    for t, e in enumerate(choices):  # scan in flattened order: first come, first served
        if len(kept[e]) < capacity:
            kept[e].append(t)
    assert d.token_index.tolist() == [t for e in range(6) for t in kept[e]]
    assert d.counts == [len(kept[e]) for e in range(6)]
    assert sum(d.counts) <= min(len(choices), 6 * capacity)


def test_capacity_is_never_below_min_or_ceil():
    for tokens in (1, 7, 64, 1000):
        for e in (1, 3, 8):
            c = expert_capacity(tokens, e, 1.25, 4)
            assert c == max(4, math.ceil(1.25 * tokens / e))
