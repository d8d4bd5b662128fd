import math

import pytest
import torch
from torch import nn

import moeify
from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.layers.losses import fused_router_losses, load_balancing_loss, router_z_loss

LN2 = math.log(2.0)


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1]], requires_grad=True)
    idx = torch.tensor([0, 1, 0, 0])
    # f = (3/4, 1/4, 0), P = (0.475, 0.425, 0.1): 3 * (0.75 * 0.475 + 0.25 * 0.425) = 3 * 0.4625
    loss = load_balancing_loss(probs, idx)
    assert loss.item() == pytest.approx(1.3875, abs=1e-6)
    loss.backward()  # d/dprobs[t, i] = E * f_i / T: the counts f carry no gradient
    expected = torch.tensor([3 * 0.75 / 4, 3 * 0.25 / 4, 0.0]).expand(4, 3)
    torch.testing.assert_close(probs.grad, expected, rtol=0, atol=1e-7)


def test_uniform_routing_gives_loss_one_exactly():
    probs = torch.full((8, 4), 0.25)
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert load_balancing_loss(probs, idx).item() == 1.0


def test_every_token_on_one_expert_gives_e_times_its_probability():
    probs = torch.tensor([[0.1, 0.7, 0.1, 0.1]]).repeat(6, 1)
    idx = torch.ones(6, dtype=torch.long)  # f = (0, 1, 0, 0), P_1 = 0.7
    assert load_balancing_loss(probs, idx).item() == pytest.approx(4 * 0.7, abs=1e-6)
    # The last expert unused: counts still cover all E experts.
    probs = torch.tensor([[0.9, 0.05, 0.05]]).repeat(5, 1)
    assert load_balancing_loss(probs, torch.zeros(5, dtype=torch.long)).item() == pytest.approx(3 * 0.9, abs=1e-6)
    # The counts come from the expert choices given, not from the probabilities' argmax.
    probs = torch.tensor([[0.6, 0.4]]).repeat(4, 1)
    assert load_balancing_loss(probs, torch.ones(4, dtype=torch.long)).item() == pytest.approx(2 * 0.4, abs=1e-6)


def test_z_loss_by_hand():
    # logsumexp(0, 0) = log 2
    assert router_z_loss(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(LN2 ** 2, rel=1e-6)
    # Two tokens: log(1 + 1) = log 2 and log(3 + 1) = 2 log 2, so the mean of squares is 5/2 (log 2)^2.
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert router_z_loss(logits).item() == pytest.approx(2.5 * LN2 ** 2, rel=1e-6)
    # Three experts, one token: log(1 + 2 + 5) = 3 log 2 (the log-partition is over experts).
    logits = torch.tensor([[0.0, math.log(2.0), math.log(5.0)]])
    assert router_z_loss(logits).item() == pytest.approx(9 * LN2 ** 2, rel=1e-6)
    # Large logits do not overflow: log(e^100 + e^100) = 100 + log 2.
    assert router_z_loss(torch.tensor([[100.0, 100.0]])).item() == pytest.approx((100 + LN2) ** 2, rel=1e-6)


def test_z_loss_gradient_by_hand():
    logits = torch.zeros(1, 2, requires_grad=True)
    router_z_loss(logits).backward()  # d/dl lse^2 = 2 lse * softmax = 2 log 2 * (1/2, 1/2)
    torch.testing.assert_close(logits.grad, torch.tensor([[LN2, LN2]]), rtol=1e-6, atol=0)


def _layer(num_experts=4, **routing):
    layer = SwitchFFN(8, 16, RoutingConfig(num_experts=num_experts, **routing), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    layer.router.reset_parameters(1.0, g)
    layer.experts.reset_parameters(1.0, g)
    return layer


def test_collector_totals_and_removes_hooks():
    model = nn.Sequential(_layer(aux_loss_coef=0.5, z_loss_coef=0.25), _layer())
    x = torch.randn(3, 6, 8)
    with moeify.router_losses(model) as losses:
        model(x)
    assert [r.name for r in losses.layers] == ["0", "1"]
    first, second = losses.layers
    expected = 0.5 * first.aux_loss + 0.25 * first.z_loss + 1e-2 * second.aux_loss + 1e-3 * second.z_loss
    torch.testing.assert_close(losses.total(), expected)
    assert first.tokens == 18 and first.capacity == 6  # ceil(1.25 * 18 / 4)
    model(x)  # outside the block: nothing more is collected
    assert len(losses.layers) == 2
    assert all(not m.router._forward_hooks for m in model)


def test_total_is_differentiable_to_the_router():
    layer = _layer()
    with moeify.router_losses(layer) as losses:
        layer(torch.randn(10, 8))
    losses.total().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_collector_refuses_a_model_without_switch_layers():
    with pytest.raises(moeify.MoeifyError, match="no SwitchFFN layers"):
        with moeify.router_losses(nn.Linear(2, 2)):
            pass


def _router_output(tokens=12, experts=5, top_k=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(tokens * 10 + experts)
    logits = (torch.randn(tokens, experts, generator=g, dtype=dtype) * 3).requires_grad_()
    probs = torch.softmax(logits, -1)
    index = probs.topk(top_k, -1).indices
    return logits, probs, index


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("weights", [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.3, -2.0, 5.0)])
def test_fused_losses_equal_the_two_definitions_values_and_gradients(top_k, weights):
    """fused_router_losses' (aux, z, weighted sum) and its hand-written backward against autograd through
    load_balancing_loss and router_z_loss, whichever outputs the loss uses."""
    aux_coef, z_coef = 0.7, 0.05
    logits, probs, index = _router_output(top_k=top_k)
    f = torch.zeros(5, dtype=torch.float64).index_add_(0, index.reshape(-1), torch.ones(index.numel(),
                                                                                     dtype=torch.float64)) / 12
    aux, z, total = fused_router_losses(logits, probs, f, aux_coef, z_coef)
    ref_aux, ref_z = load_balancing_loss(probs, index), router_z_loss(logits)
    torch.testing.assert_close((aux, z, total), (ref_aux, ref_z, aux_coef * ref_aux + z_coef * ref_z),
                               rtol=1e-12, atol=0)
    # Only the outputs with a weight enter the loss: the others' gradients reach the backward as None.
    ours = sum(w * t for w, t in zip(weights, (aux, z, total)) if w)
    theirs = sum(w * t for w, t in zip(weights, (ref_aux, ref_z, aux_coef * ref_aux + z_coef * ref_z)) if w)
    ours, theirs = (torch.autograd.grad(t, logits, retain_graph=True)[0] for t in (ours, theirs))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-15)


def test_fused_losses_pass_gradcheck_and_take_the_given_fractions():
    """The backward is the forward's derivative (finite differences, float64), with f given from outside (a
    distributed step's global fractions) and held constant."""
    logits = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    f = torch.tensor([0.1, 0.5, 0.4, 0.0], dtype=torch.float64)

    def losses(lg):
        return fused_router_losses(lg, torch.softmax(lg, -1), f, 0.3, 0.02)

    assert torch.autograd.gradcheck(losses, (logits,))
    aux = losses(logits)[0]
    torch.testing.assert_close(aux, 4 * (f * torch.softmax(logits, -1).mean(0)).sum())


def test_fused_losses_with_a_zero_coefficient_leave_that_loss_out_of_the_total():
    logits, probs, index = _router_output()
    f = torch.full((5,), 0.2, dtype=torch.float64)
    _, z, total = fused_router_losses(logits, probs, f, 0.0, 1.0)
    torch.testing.assert_close(total, z, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(total, logits)[0], torch.autograd.grad(router_z_loss(logits),
                                                                                          logits)[0])
