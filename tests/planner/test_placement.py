from moeify.planner import placement as place


def test_balanced_blocks_and_uneven_splits():
    assert place.balanced(8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert place.balanced(6, 4) == [0, 0, 1, 1, 2, 3]


def test_load_aware_balances_and_keeps_slot_counts():
    loads = (0.4, 0.3, 0.1, 0.1, 0.05, 0.05)
    p = place.load_aware(loads, 3)
    assert sorted(p.count(r) for r in range(3)) == [2, 2, 2]
    per_rank = [sum(loads[e] for e in range(6) if p[e] == r) for r in range(3)]
    assert max(per_rank) == max(0.4 + 0.05, 0.3 + 0.1, 0.1 + 0.05)  # LPT: 0.45, 0.4, 0.15
    balanced = [sum(loads[e] for e in range(6) if place.balanced(6, 3)[e] == r) for r in range(3)]
    assert max(per_rank) < max(balanced)


def test_replicate_hot_adds_a_copy_on_the_coolest_other_rank():
    loads = (0.7, 0.1, 0.1, 0.1)
    placement = place.balanced(4, 2)  # [0, 0, 1, 1]
    replicas = place.replicate_hot(placement, loads, 2, 1)
    assert replicas == {0: [0, 1], 1: [0], 2: [1], 3: [1]}
