import math

import pytest
import torch
from tiny import tiny_switch as make
from torch import nn

from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN


def reference(layer: SwitchFFN, x: torch.Tensor) -> torch.Tensor:
    """Token by token, in flattened order, exactly as the paper describes."""
    ex, flat = layer.experts, x.reshape(-1, x.shape[-1])
    logits = flat.float() @ layer.router.weight.float().t()
    probs = torch.softmax(logits, -1)
    capacity = layer.capacity(flat.shape[0])
    used = [0] * layer.num_experts
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        e = int(probs[t].argmax())
        if used[e] == capacity:
            continue  # dropped: output exactly zero
        used[e] += 1
        h = flat[t] @ ex.w_in[e].t() + (ex.b_in[e] if ex.b_in is not None else 0)
        if ex.gated:
            h = ex.act(flat[t] @ ex.w_gate[e].t() + (ex.b_gate[e] if ex.b_gate is not None else 0)) * h
        else:
            h = ex.act(h)
        y = h @ ex.w_out[e].t() + (ex.b_out[e] if ex.b_out is not None else 0)
        out[t] = probs[t, e] * y
    return out.reshape(x.shape)


@pytest.mark.parametrize("gated,bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("training", [False, True])
def test_matches_token_by_token_reference(gated, bias, training):
    layer = make(gated=gated, bias=bias, capacity_factor=0.75, eval_capacity_factor=1.0, min_capacity=1)
    layer.train(training)
    x = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-5, atol=1e-5)


def test_dropped_tokens_output_exactly_zero():
    layer = make(num_experts=2, capacity_factor=0.25, min_capacity=1).train()
    x = torch.randn(1, 16, 8)
    with torch.no_grad():
        y = layer(x).reshape(16, 8)
    capacity = layer.capacity(16)
    assert capacity == 2
    routed = torch.bincount(layer.router(x.reshape(16, 8)).expert_index.reshape(-1), minlength=2)
    dropped = int((routed - routed.clamp(max=capacity)).sum())
    assert dropped >= 12
    assert int((y == 0).all(-1).sum()) == dropped  # kept tokens are never all-zero here


def test_train_and_eval_capacity_factors():
    layer = make(num_experts=4, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    layer.train()
    assert layer.capacity(100) == 25
    layer.eval()
    assert layer.capacity(100) == 50


def test_bfloat16_model_keeps_a_float32_router():
    layer = make().to(torch.bfloat16)
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.router.weight.dtype == torch.float32
    assert layer.router(x.reshape(-1, 8)).logits.dtype == torch.float32


def test_backward_reaches_router_and_experts():
    layer = make(gated=True, bias=True).train()
    layer(torch.randn(4, 6, 8)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    assert layer.router.weight.grad.abs().sum() > 0  # through the gate


def test_expert_dropout_only_in_training():
    layer = SwitchFFN(8, 16, RoutingConfig(num_experts=2), nn.ReLU(), dropout=0.9)
    layer.router.reset_parameters(1.0)
    layer.experts.reset_parameters(1.0)
    x = torch.randn(20, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    assert math.isclose(layer.experts.dropout.p, 0.9)


@pytest.mark.parametrize("kernel", ["cpu", "cuda"])
@pytest.mark.parametrize("capacity_factor, shortcut", [(1.0, True), (0.5, False)])
def test_one_expert_with_room_for_every_token_skips_dispatch_and_changes_nothing(
        monkeypatch, kernel, capacity_factor, shortcut):
    """E = 1 with capacity for every token is the identity plan: the shortcut gives the general path's output and
    every gradient (router included, through its losses); with too little capacity the general path drops tokens."""
    from moeify.layers.collector import router_losses

    results = []
    for forced_general in (False, True):
        routing = RoutingConfig(num_experts=1, capacity_factor=capacity_factor, min_capacity=1, kernel=kernel,
                                z_loss_coef=1e-2)
        m = SwitchFFN(16, 32, routing, nn.ReLU())
        g = torch.Generator().manual_seed(0)
        m.router.reset_parameters(1.0, g)
        m.experts.reset_parameters(1.0, g)
        assert m.keeps_every_token(12) is shortcut
        if forced_general:
            monkeypatch.setattr(m, "keeps_every_token", lambda n: False)
        x = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with router_losses(m) as losses:
            y = m(x)
            (y.sin().sum() + losses.total()).backward()
        results.append((y, x.grad, [p.grad for p in m.parameters()], losses.layers[0].dropped))
    (y0, gx0, gp0, d0), (y1, gx1, gp1, d1) = results
    assert d0 == d1 == (0 if shortcut else 6)
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(gx0, gx1)
    for a, b in zip(gp0, gp1):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bias", [False, True])
def test_a_layer_built_by_hand_starts_with_the_papers_init(bias):
    """Usable as built, as nn.Linear is: truncated normal at scale 0.1, zero biases; on meta nothing is drawn."""
    layer = SwitchFFN(16, 32, RoutingConfig(num_experts=4), nn.ReLU(), bias=bias)
    for w in (layer.router.weight, layer.experts.w_in, layer.experts.w_out):
        std = math.sqrt(0.1 / w.shape[-1])
        assert w.abs().max() <= 2 * std + 1e-7 and w.std() > std / 2
    for b in (layer.experts.b_in, layer.experts.b_out):
        assert b is None if not bias else not b.any()
    assert torch.isfinite(layer(torch.randn(2, 5, 16))).all()
    state = torch.random.get_rng_state()
    on_meta = SwitchFFN(16, 32, RoutingConfig(num_experts=4), nn.ReLU(), device="meta")
    assert on_meta.experts.w_in.is_meta and torch.equal(torch.random.get_rng_state(), state)


def test_pooled_combine_buffer_is_zero_where_tokens_drop(monkeypatch):
    # The combine's (T, d_model) buffer comes from the cpu kernel's buffer cache when large; a recycled block holds
    # the last step's rows, so dropped tokens must still come out exactly zero.
    from moeify.layers import memory

    monkeypatch.setattr(memory, "_MIN_BYTES", 1)
    memory.empty_cache()
    layer = make(capacity_factor=0.75, min_capacity=1)
    x = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        first = layer(x)
        assert memory._live and first.data_ptr() in memory._live  # from the cache
        del first
        for block in memory._free:  # every recycled block (the output's and the combine's temporaries) holds 7s
            torch.frombuffer(memoryview(block.map), dtype=torch.float32).fill_(7.0)
        second = layer(x)
    assert second.data_ptr() in memory._live  # a recycled block, written with 7s
    expected = reference(layer, x)
    dropped = expected.reshape(-1, 8).eq(0).all(-1)
    assert bool(dropped.any()) and bool(second.reshape(-1, 8)[dropped].eq(0).all())
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)
    memory.empty_cache()
