import pytest
import torch
from torch import nn

import moeify
from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.layers.losses import load_balancing_loss, router_z_loss


def test_load_balancing_loss_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1]])
    idx = probs.argmax(-1)  # experts 0, 1, 0, 0
    f = torch.tensor([3 / 4, 1 / 4, 0.0])
    p = probs.mean(0)
    assert load_balancing_loss(probs, idx).item() == pytest.approx(3 * (f * p).sum().item())


def test_uniform_routing_gives_loss_one():
    probs = torch.full((8, 4), 0.25)
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert load_balancing_loss(probs, idx).item() == pytest.approx(1.0)


def test_z_loss():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    assert router_z_loss(logits).item() == pytest.approx(expected.item())


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
