"""Top-k routing, normalised gates and dropless capacity: hand-worked dispatch, a naive reference,
the invariants (top-1 unchanged, k = E dense-equivalent) and Mixtral's load-balancing loss."""
import pytest
import torch
from tiny import t5_batch, tiny_t5
from tiny import tiny_switch as make
from torch import nn

import moeify
from moeify.config import expert_capacity
from moeify.layers.dispatch import dispatch
from moeify.layers.losses import load_balancing_loss
from moeify.layers.router import Router
from moeify.layers.router import softmax as router_softmax


def test_capacity_counts_every_choice():
    assert expert_capacity(10, 4, 1.25, 0, top_k=2) == 7  # ceil(1.25 * 2 * 10 / 4) = ceil(6.25)
    assert expert_capacity(12, 4, 1.0, 0, top_k=2) == 6  # exactly 6.0
    assert expert_capacity(3, 8, 1.25, 4, top_k=2) == 4  # the minimum wins
    assert expert_capacity(100, 10, 1.1, 0, top_k=3) == 33  # 1.1 * 3 * 100 / 10 = 33 exactly, not 34


def test_first_choices_take_slots_before_any_second_choice():
    # token:        0       1       2       3
    choices = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    d = dispatch(choices, num_experts=3, capacity=2)
    # expert 0 is asked by t0, t1, t3 (first choices) then t2 (second): keeps t0, t1.
    # expert 1 by t2 (first) then t0, t3 (second): keeps t2 and t0's second choice. expert 2: t1's second.
    assert d.assignment.tolist() == [0, 1, 2, 4, 5]  # a = choice * 4 + token
    assert d.token_index.tolist() == [0, 1, 2, 0, 1]
    assert d.expert.tolist() == [0, 0, 1, 1, 2]
    assert d.counts == [2, 2, 1] and d.routed.tolist() == [4, 3, 1] and d.capacity == 2


def test_dropless_keeps_every_assignment_and_sizes_buffers_by_the_busiest_expert():
    choices = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    d = dispatch(choices, num_experts=3, capacity=None)
    assert d.assignment.tolist() == [0, 1, 3, 6, 2, 4, 7, 5]
    assert d.counts == [4, 3, 1] and d.capacity == 4


def test_router_top_k_and_normalised_gates():
    r = Router(8, 5, top_k=3, normalize=True)
    r.reset_parameters(1.0, torch.Generator().manual_seed(0))
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(1))
    out = r(x)
    probs = torch.softmax(x @ r.weight.t(), -1)
    top, index = probs.topk(3, -1)
    assert torch.equal(out.expert_index, index)
    torch.testing.assert_close(out.gate, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(out.gate.sum(-1), torch.ones(7))
    plain = Router(8, 5, top_k=3)
    plain.load_state_dict(r.state_dict())
    torch.testing.assert_close(plain(x).gate, top)  # gate = probability, as in the paper


def naive_top_k(layer, x):
    """Token by token and choice by choice: every first choice claims a slot before any second one."""
    ex, flat = layer.experts, x.reshape(-1, x.shape[-1])
    probs = torch.softmax(flat.float() @ layer.router.weight.float().t(), -1)
    gate, index = probs.topk(layer.top_k, -1)
    if layer.routing.normalize_gates:
        gate = gate / gate.sum(-1, keepdim=True)
    capacity = layer.capacity(flat.shape[0])
    used = [0] * layer.num_experts
    out = torch.zeros_like(flat)
    for choice in range(layer.top_k):
        for t in range(flat.shape[0]):
            e = int(index[t, choice])
            if capacity is not None and used[e] == capacity:
                continue
            used[e] += 1
            h = ex.act(flat[t] @ ex.w_in[e].t())
            out[t] += gate[t, choice] * (h @ ex.w_out[e].t())
    return out.reshape(x.shape)


@pytest.mark.parametrize("top_k", [2, 3])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dropless", [False, True])
def test_top_k_matches_the_naive_reference(top_k, normalize, dropless):
    layer = make(num_experts=5, top_k=top_k, normalize_gates=normalize, dropless=dropless,
                 eval_capacity_factor=0.6, min_capacity=1).eval()
    x = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), moeify.router_losses(nn.Sequential(layer)) as losses:
        y = layer(x)
    torch.testing.assert_close(y, naive_top_k(layer, x), rtol=1e-5, atol=1e-5)
    assert (losses.layers[0].dropped == 0) == dropless  # the capacity case really drops assignments
    assert losses.layers[0].tokens == 27 * top_k


def old_top1_forward(layer, hidden):
    """The top-1 layer as it was before top-k existed: argmax, stable sort, first `capacity` kept, copy."""
    x = hidden.reshape(-1, hidden.shape[-1])
    logits = nn.functional.linear(x.float(), layer.router.weight)
    gate, expert = router_softmax(logits).max(-1)
    capacity = layer.capacity(x.shape[0])
    order = torch.argsort(expert, stable=True)
    routed = torch.bincount(expert, minlength=layer.num_experts)
    slot = torch.arange(x.shape[0]) - (torch.cumsum(routed, 0) - routed)[expert[order]]
    kept = order[slot < capacity]
    y = layer.experts(x.index_select(0, kept), routed.clamp(max=capacity).tolist())
    y = y * gate.index_select(0, kept).to(y.dtype).unsqueeze(-1)
    return y.new_zeros(x.shape[0], y.shape[-1]).index_copy(0, kept, y).view(hidden.shape)


@pytest.mark.parametrize("training", [False, True])
def test_top_1_without_normalisation_is_bit_identical_to_the_top_1_layer(training):
    layer = make(num_experts=4, capacity_factor=0.5, eval_capacity_factor=0.75, min_capacity=1).train(training)
    x = torch.randn(4, 13, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    reference = old_top1_forward(layer, x)
    reference.pow(2).sum().backward()
    assert torch.equal(y, reference)
    for got, want in zip(grads, [p.grad for p in layer.parameters()] + [x.grad]):
        assert torch.equal(got, want)


def test_all_experts_normalised_and_dropless_with_identical_experts_is_the_dense_model():
    dense = tiny_t5("relu")
    sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=4, top_k=4, normalize_gates=True, dropless=True,
                                                    every=1)).eval()
    with torch.no_grad():
        torch.testing.assert_close(sparse(**t5_batch()).logits, dense(**t5_batch()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_equals_mixtrals(top_k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(37, 6, generator=torch.Generator().manual_seed(top_k)) * 3
    probs = torch.softmax(logits, -1)
    ours = load_balancing_loss(probs, probs.topk(top_k, -1).indices)
    theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=top_k)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_a_layers_collected_loss_equals_mixtrals_on_its_logits():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layer = make(num_experts=6, top_k=2, normalize_gates=True, dropless=True)
    x = torch.randn(5, 11, 8, generator=torch.Generator().manual_seed(3))
    with moeify.router_losses(nn.Sequential(layer)) as losses:
        layer(x)
    logits = layer.router(x.reshape(-1, 8)).logits
    torch.testing.assert_close(losses.layers[0].aux_loss, load_balancing_loss_func((logits,), 6, top_k=2),
                               rtol=1e-6, atol=0)
