"""Property tests of the routing core: capacity, dispatch, combine, dropped counts, load balancing and token order."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from moeify.config import RoutingConfig, expert_capacity
from moeify.layers import SwitchFFN
from moeify.layers.collector import router_losses
from moeify.layers.dispatch import dispatch, dispatch_static
from moeify.layers.losses import load_balancing_loss

# Derandomized and without an example database: CI draws the same examples on every run and machine.
PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, database=None)
LAYER_PROPERTY = settings(PROPERTY, max_examples=30)  # per kernel where parametrized: the same examples on each
# Capacity factors, mostly small enough to drop something; None is dropless, in about a quarter of the examples.
FACTORS = [0.1, 0.25, 0.5, 0.75, 1.0, 1.1, 1.25, 2.0] + [None] * 3
KERNELS = ["reference", "cpu", "cuda"]  # the "cuda" kernel plans with dispatch_static, and runs on the CPU too


@st.composite
def routings(draw, min_tokens: int = 0, max_tokens: int = 40):
    """(choices, num_experts, k, capacity): per token k distinct experts, as a top-k router picks them, and
    expert_capacity() for some factor, or None (dropless)."""
    num_experts = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(3, num_experts)))
    tokens = draw(st.integers(min_tokens, max_tokens))
    # Shrinking and small draws favour the identity permutation: piles on expert 0 that overflow it.
    choices = draw(st.lists(st.permutations(range(num_experts)).map(lambda p: p[:k]),
                            min_size=tokens, max_size=tokens))
    factor, minimum = draw(st.sampled_from(FACTORS)), draw(st.integers(0, 4))
    capacity = None if factor is None else expert_capacity(tokens, num_experts, factor, minimum, k)
    return choices, num_experts, k, capacity


def as_index(choices: list[list[int]], k: int) -> torch.Tensor:
    return torch.tensor(choices, dtype=torch.long).reshape(len(choices), k)  # (T, k), also for T = 0


def load_of(choices: list[list[int]]) -> Counter:
    """Assignments per expert, counted from the choices alone."""
    return Counter(e for row in choices for e in row)


def limit_of(choices: list[list[int]], capacity: int | None) -> int:
    """Slots per expert: the capacity, or when dropless the busiest expert's load."""
    return capacity if capacity is not None else max(load_of(choices).values(), default=0)


def over_capacity(choices: list[list[int]], num_experts: int, capacity: int | None) -> int:
    if capacity is None:
        return 0
    load = load_of(choices)
    return sum(max(0, load[e] - capacity) for e in range(num_experts))


def groups(counts: list[int]) -> list[int]:
    """The expert of each row of rows grouped by expert, counts[e] rows for expert e."""
    return [e for e, n in enumerate(counts) for _ in range(n)]


@PROPERTY
@given(routings())
def test_dispatch_sends_each_kept_row_to_its_chosen_expert_and_none_past_capacity(routing):
    choices, num_experts, k, capacity = routing
    tokens = len(choices)
    plan = dispatch(as_index(choices, k), num_experts, capacity)
    assert plan.capacity == limit_of(choices, capacity)
    rows = groups(plan.counts)
    assert len(rows) == len(plan.assignment) == len(plan.token_index) == len(plan.expert)
    chosen = []
    for e, a, t, x in zip(rows, plan.assignment.tolist(), plan.token_index.tolist(), plan.expert.tolist()):
        choice, token = divmod(a, tokens)
        assert token == t and x == e and choices[t][choice] == e  # the row in e's group chose e
        chosen.append(e)
    assert len(set(plan.assignment.tolist())) == len(rows)  # no assignment kept twice
    load = Counter(chosen)
    assert all(load[e] <= plan.capacity for e in range(num_experts))


@PROPERTY
@given(routings())
def test_dispatch_static_keeps_what_dispatch_keeps_each_row_to_its_choice(routing):
    choices, num_experts, k, capacity = routing
    tokens = len(choices)
    plan = dispatch(as_index(choices, k), num_experts, capacity)
    static = dispatch_static(as_index(choices, k), num_experts, capacity)
    kept = len(plan.assignment)
    # Its docstring: the same kept assignments in the same order, then the dropped ones.
    assert static.keep.tolist() == [True] * kept + [False] * (tokens * k - kept)
    assert static.assignment[:kept].tolist() == plan.assignment.tolist()
    assert sorted(static.assignment.tolist()) == list(range(tokens * k))  # every assignment exactly once
    assert static.routed.tolist() == plan.routed.tolist() == [load_of(choices)[e] for e in range(num_experts)]
    rows = groups(static.counts.tolist())
    assert len(rows) == tokens * k  # the dropped rows ride with the last expert: all rows are covered
    chosen = []
    for e, a, t, keep in zip(rows, static.assignment.tolist(), static.token_index.tolist(), static.keep.tolist()):
        choice, token = divmod(a, tokens)
        assert token == t
        if keep:
            assert choices[t][choice] == e
            chosen.append(e)
    load = Counter(chosen)
    assert all(load[e] <= limit_of(choices, capacity) for e in range(num_experts))


@PROPERTY
@given(routings())
def test_the_dropped_count_is_the_assignments_over_capacity(routing):
    choices, num_experts, k, capacity = routing
    expected = over_capacity(choices, num_experts, capacity)
    plan = dispatch(as_index(choices, k), num_experts, capacity)
    static = dispatch_static(as_index(choices, k), num_experts, capacity)
    assert len(choices) * k - len(plan.assignment) == expected
    assert len(choices) * k - sum(plan.counts) == expected
    assert int((~static.keep).sum()) == expected


@PROPERTY
@given(routings())
def test_each_expert_keeps_its_earliest_assignments_in_the_documented_order(routing):
    """dispatch's docstring: every first choice before any second, earlier tokens first within a choice."""
    choices, num_experts, k, capacity = routing
    tokens = len(choices)
    plan = dispatch(as_index(choices, k), num_experts, capacity)
    limit = limit_of(choices, capacity)
    start = 0
    for e, n in enumerate(plan.counts):
        asked = sorted((c, t) for t, row in enumerate(choices) for c, x in enumerate(row) if x == e)
        kept = [divmod(a, tokens) for a in plan.assignment[start:start + n].tolist()]
        assert kept == asked[:limit]
        start += n


def layer_for(routing: RoutingConfig, extra: int, identity: bool, seed: int) -> SwitchFFN:
    """A layer whose router logits are exactly the first E input features, so the examples choose the routing.
    identity: expert e computes 2**e * x exactly (relu(x) - relu(-x), scaled by a power of two), so an output
    names the expert that made it; otherwise random GELU experts with biases (they give nonzero outputs for zero
    inputs, so a dropped row that is not masked shows)."""
    num_experts = routing.num_experts
    d = num_experts + extra
    layer = SwitchFFN(d, 2 * d, routing, nn.ReLU() if identity else nn.GELU(), bias=not identity).eval()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(num_experts, d))
        if identity:
            eye = torch.eye(d)
            layer.experts.w_in.copy_(torch.cat([eye, -eye]).expand(num_experts, -1, -1))
            scale = 2.0 ** torch.arange(num_experts, dtype=torch.float32)
            layer.experts.w_out.copy_(torch.cat([eye, -eye], 1) * scale[:, None, None])
        else:
            g = torch.Generator().manual_seed(seed)
            layer.experts.reset_parameters(1.0, g)
            for b in (layer.experts.b_in, layer.experts.b_out):
                b.normal_(generator=g)
    return layer


@st.composite
def layer_cases(draw):
    """(routing, extra, seed, x): x is (T, E + extra), its first E columns the router logits, skewed and sometimes
    tied. The tests build the layer on each kernel from it (the kernel decides between dispatch and dispatch_static)."""
    num_experts = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(3, num_experts)))
    factor = draw(st.sampled_from(FACTORS))
    routing = RoutingConfig(num_experts=num_experts, top_k=k, normalize_gates=draw(st.booleans()),
                            dropless=factor is None, eval_capacity_factor=factor or 1.0,
                            min_capacity=draw(st.integers(0, 4)))
    tokens, extra, seed = draw(st.integers(1, 40)), draw(st.integers(0, 5)), draw(st.integers(0, 2**16))
    # scale 0: every token has the same logits, all pile onto the same experts (ties broken by the router).
    scale = draw(st.sampled_from([0.0, 0.5, 4.0]))
    bias = torch.tensor(draw(st.lists(st.sampled_from([0.0, 1.0, 3.0]), min_size=num_experts,
                                      max_size=num_experts)))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=g) * scale + bias
    return routing, extra, seed, torch.cat([logits, torch.randn(tokens, extra, generator=g)], 1)


def built(case, kernel: str, identity: bool = False) -> tuple[SwitchFFN, torch.Tensor]:
    routing, extra, seed, x = case
    return layer_for(dataclasses.replace(routing, kernel=kernel), extra, identity, seed), x


def kept_choices(layer: SwitchFFN, expert_index: torch.Tensor) -> list[set[int]]:
    """Per token, the choices (0..k-1) whose assignment the layer's plan keeps."""
    tokens = expert_index.shape[0]
    kept: list[set[int]] = [set() for _ in range(tokens)]
    for a in dispatch(expert_index, layer.num_experts, layer.capacity(tokens)).assignment.tolist():
        choice, token = divmod(a, tokens)
        kept[token].add(choice)
    return kept


@pytest.mark.parametrize("kernel", KERNELS)
@LAYER_PROPERTY
@given(case=layer_cases())
def test_with_identity_experts_a_token_gets_its_gated_input_or_exactly_zero(kernel, case):
    layer, x = built(case, kernel, identity=True)
    with torch.no_grad():
        out = layer(x)
        route = layer.router(x)
    expected = torch.zeros(x.shape, dtype=torch.float64)
    kept = kept_choices(layer, route.expert_index)
    for t, choices in enumerate(kept):
        for c in choices:  # gate * x through expert e, which multiplies by 2**e: the row went to its choice
            expected[t] += float(route.gate[t, c]) * 2.0 ** int(route.expert_index[t, c]) * x[t].double()
    if layer.top_k == 1:  # one exact product per token (gate * 2**e * x fits float64): bitwise equal
        assert torch.equal(out, expected.float())
    else:
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6 * (1 + float(expected.abs().max())))
    dropped = [t for t, choices in enumerate(kept) if not choices]
    assert torch.equal(out[dropped], torch.zeros(len(dropped), x.shape[1]))  # the residual carries them


@pytest.mark.parametrize("kernel", KERNELS)
@LAYER_PROPERTY
@given(case=layer_cases())
def test_a_token_whose_every_choice_dropped_gives_exactly_zero_even_from_biased_experts(kernel, case):
    layer, x = built(case, kernel)
    with torch.no_grad():
        out = layer(x)
    dropped = [t for t, choices in enumerate(kept_choices(layer, layer.router(x).expert_index)) if not choices]
    assert torch.equal(out[dropped], torch.zeros(len(dropped), x.shape[1]))


@LAYER_PROPERTY
@given(case=layer_cases())
def test_the_collector_counts_the_assignments_over_capacity(case):
    layer, x = built(case, "cpu")  # the collector reads the router's choices: the kernel plays no part
    with torch.no_grad(), router_losses(layer) as losses:
        layer(x)
    choices = layer.router(x).expert_index.tolist()
    (r,) = losses.layers
    assert r.dropped == over_capacity(choices, layer.num_experts, layer.capacity(x.shape[0]))
    assert r.tokens_per_expert.tolist() == [load_of(choices)[e] for e in range(layer.num_experts)]


@pytest.mark.parametrize("kernel", KERNELS)
@LAYER_PROPERTY
@given(case=layer_cases(), data=st.data())
def test_permuting_tokens_permutes_the_output_where_the_priority_order_keeps_the_same_choices(kernel, case, data):
    layer, x = built(case, kernel)
    tokens = x.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(tokens))), dtype=torch.long)
    with torch.no_grad(), router_losses(layer) as losses:
        out, out_p = layer(x), layer(x[perm])
    route, route_p = layer.router(x), layer.router(x[perm])
    assert torch.equal(route_p.expert_index, route.expert_index[perm])  # logits are inputs: the same choices
    kept, kept_p = kept_choices(layer, route.expert_index), kept_choices(layer, route_p.expert_index)
    same = [i for i in range(tokens) if kept_p[i] == kept[int(perm[i])]]
    torch.testing.assert_close(out_p[same], out[perm][same], rtol=1e-5, atol=1e-6)
    capacity = layer.capacity(tokens)
    if capacity is None or capacity >= max(load_of(route.expert_index.tolist()).values()):
        assert len(same) == tokens  # nothing dropped: nothing depends on order, every row permutes
    # Only which assignments drop depends on order: how many per expert does not, nor the losses.
    a, b = losses.layers
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert) and a.dropped == b.dropped
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-5, atol=0)


@PROPERTY
@given(routings(min_tokens=1))
def test_uniform_probabilities_give_the_balanced_loss_whatever_the_choices(routing):
    """P_i = 1/E: E * sum f_i / E = sum f_i = k (the paper's 1 for top-1), however unevenly tokens went."""
    choices, num_experts, k, _ = routing
    probs = torch.full((len(choices), num_experts), 1.0 / num_experts)
    loss = load_balancing_loss(probs, as_index(choices, k))
    torch.testing.assert_close(loss, torch.tensor(float(k)), rtol=2e-6, atol=0)


@PROPERTY
@given(st.integers(1, 8), st.integers(1, 3), st.integers(1, 6), st.integers(0, 2**16), st.sampled_from([0.1, 1, 8]))
def test_balanced_choices_give_the_balanced_loss_whatever_the_probabilities(num_experts, k, per_expert, seed, scale):
    """f_i = k/E for every expert: E * sum (k/E) P_i = k * sum P_i = k, as rows of probabilities sum to 1."""
    k = min(k, num_experts)
    tokens = per_expert * num_experts
    g = torch.Generator().manual_seed(seed)
    shift = torch.randperm(tokens, generator=g)  # token t's choices: k consecutive experts from a shuffled start
    index = (shift[:, None] + torch.arange(k)) % num_experts
    assert Counter(index.reshape(-1).tolist()) == {e: per_expert * k for e in range(num_experts)}
    probs = torch.softmax(torch.randn(tokens, num_experts, generator=g) * scale, -1)
    torch.testing.assert_close(load_balancing_loss(probs, index), torch.tensor(float(k)), rtol=2e-6, atol=0)
    # The same batch's f handed in (a distributed step's global batch) gives the same value.
    uniform = torch.full((num_experts,), k / num_experts)
    torch.testing.assert_close(load_balancing_loss(probs, index, uniform), torch.tensor(float(k)),
                               rtol=2e-6, atol=0)


@LAYER_PROPERTY
@given(case=layer_cases())
def test_a_zero_router_gives_the_balanced_loss_through_the_collector(case):
    """All logits 0: uniform probabilities, every token on the first experts, and still the balanced value k."""
    layer, x = built(case, "cpu")
    with torch.no_grad():
        layer.router.weight.zero_()
    with torch.no_grad(), router_losses(layer) as losses:
        layer(x)
    torch.testing.assert_close(losses.layers[0].aux_loss, torch.tensor(float(layer.top_k)), rtol=2e-6, atol=0)
