import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeify.config import expert_capacity
from moeify.layers.dispatch import dispatch


@pytest.mark.parametrize("tokens, experts, factor, minimum, expected", [
    (10, 4, 1.25, 0, 4),  # 12.5 / 4 = 3.125 -> 4
    (10, 4, 1.25, 4, 4),  # ceil and minimum agree
    (10, 4, 1.25, 5, 5),  # the minimum dominates
    (10, 8, 1.25, 4, 4),  # 1.5625 -> 2, the minimum 4 wins
    (1024, 8, 1.25, 4, 160),  # 1280 / 8 = 160 exactly
    (12, 4, 1.0, 0, 3),  # exactly 3.0: 3, not 4
    (16, 5, 1.25, 0, 4),  # 20 / 5 = 4.0 exactly (1.25 is exact in binary)
    (12, 3, 0.5, 0, 2),  # 6 / 3 = 2.0 exactly, factor below 1
    (100, 3, 1.0, 0, 34),  # 33.33.. -> 34
    (301, 100, 1.0, 0, 4),  # 3.01: just above 3 -> 4
    (1001, 1000, 1.0, 0, 2),  # 1.001: just above 1 -> 2
    (13, 4, 1.25, 0, 5),  # 16.25 / 4 = 4.0625 -> 5
    (7, 7, 0.1, 0, 1),  # 0.1: any positive fraction of a slot is a whole slot
    (1, 8, 1.25, 0, 1),
    (0, 4, 1.25, 0, 0),  # no tokens, no minimum: no slots
    (0, 4, 1.25, 3, 3),
])
def test_capacity_hand_computed(tokens, experts, factor, minimum, expected):
    got = expert_capacity(tokens, experts, factor, minimum)
    assert got == expected and isinstance(got, int)


def test_capacity_of_a_decimal_factor_that_is_exact_on_paper():
    # In floats 1.1 * 100 / 10 is 11.000000000000002: a float ceiling would give 12 slots.
    assert expert_capacity(100, 10, 1.1, 0) == 11
    assert expert_capacity(1000, 7, 0.7, 0) == 100 and expert_capacity(1001, 7, 0.7, 0) == 101
    assert expert_capacity(3, 10, 1.0, 0) == 1 and expert_capacity(0, 10, 1.25, 0) == 0


def test_earlier_tokens_win_and_order_is_grouped_by_expert():
    expert_index = torch.tensor([1, 0, 1, 1, 0, 1, 2])
    d = dispatch(expert_index[:, None], num_experts=4, capacity=2)
    assert d.token_index.tolist() == [1, 4, 0, 2, 6]  # expert 0: 1,4; expert 1: 0,2 (3,5 dropped); 2: 6
    assert d.counts == [2, 2, 1, 0]
    assert d.routed.tolist() == [2, 4, 1, 0]


def test_dispatch_with_capacity_one_and_an_unused_expert_between():
    # tokens:       0  1  2  3  4  5
    expert_index = torch.tensor([3, 3, 0, 2, 0, 3])
    d = dispatch(expert_index[:, None], num_experts=4, capacity=1)
    assert d.token_index.tolist() == [2, 3, 0]  # expert 0 keeps token 2, expert 2 token 3, expert 3 token 0
    assert d.counts == [1, 0, 1, 1]
    assert d.routed.tolist() == [2, 0, 1, 3]
    assert d.token_index.dtype == torch.long


def test_dispatch_with_room_for_everyone_keeps_every_token():
    expert_index = torch.tensor([2, 0, 2, 1, 0])
    d = dispatch(expert_index[:, None], num_experts=3, capacity=5)
    assert d.token_index.tolist() == [1, 4, 3, 0, 2]
    assert d.counts == [2, 1, 2] and d.routed.tolist() == [2, 1, 2]


def test_dispatch_with_capacity_zero_keeps_nothing_but_counts_the_routing():
    d = dispatch(torch.tensor([[1], [1], [0]]), num_experts=3, capacity=0)
    assert d.token_index.tolist() == []
    assert d.counts == [0, 0, 0] and d.routed.tolist() == [1, 2, 0]


def test_every_token_to_one_expert_keeps_the_first_capacity_tokens():
    d = dispatch(torch.zeros(10, 1, dtype=torch.long), num_experts=4, capacity=4)
    assert d.token_index.tolist() == [0, 1, 2, 3]
    assert d.counts == [4, 0, 0, 0] and d.routed.tolist() == [10, 0, 0, 0]


def test_long_inputs_keep_token_order_inside_each_expert():
    # Long enough that an unstable sort reorders tokens within an expert.
    expert_index = torch.tensor([3, 3, 0, 2, 0, 3] * 20)  # token t goes to expert [3, 3, 0, 2, 0, 3][t % 6]
    d = dispatch(expert_index[:, None], num_experts=4, capacity=7)
    expert0 = [t for t in range(120) if t % 6 in (2, 4)][:7]  # 2, 4, 8, 10, 14, 16, 20
    expert2 = [t for t in range(120) if t % 6 == 3][:7]  # 3, 9, ..., 39
    expert3 = [t for t in range(120) if t % 6 in (0, 1, 5)][:7]  # 0, 1, 5, 6, 7, 11, 12
    assert expert0 == [2, 4, 8, 10, 14, 16, 20] and expert3 == [0, 1, 5, 6, 7, 11, 12]
    assert d.token_index.tolist() == expert0 + expert2 + expert3
    assert d.counts == [7, 0, 7, 7] and d.routed.tolist() == [40, 0, 20, 60]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=80), st.integers(0, 10))
def test_dispatch_matches_a_naive_scan(choices, capacity):
    expert_index = torch.tensor(choices)
    d = dispatch(expert_index[:, None], 6, capacity)
    kept = {e: [] for e in range(6)}
    for t, e in enumerate(choices):  # scan in flattened order: first come, first served
        if len(kept[e]) < capacity:
            kept[e].append(t)
    assert d.token_index.tolist() == [t for e in range(6) for t in kept[e]]
    assert d.counts == [len(kept[e]) for e in range(6)]
    assert d.routed.tolist() == [choices.count(e) for e in range(6)]
