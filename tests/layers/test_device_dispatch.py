"""The device-side plan of the cuda kernel: the same assignments as dispatch(), the same layer, no host sync."""
import pytest
import torch
from hostreads import no_host_reads
from torch import nn

from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.layers import dispatch as dispatch_module
from moeify.layers.collector import router_losses
from moeify.layers.dispatch import dispatch, dispatch_static


@pytest.mark.parametrize("tokens, experts, k, capacity", [
    (40, 8, 1, 4), (40, 8, 2, 6), (7, 4, 1, None), (33, 5, 3, 7), (16, 4, 2, None), (9, 3, 1, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize("count_max", [dispatch_module.RUNNING_COUNT_MAX, 0], ids=["running count", "sorted"])
def test_the_static_plan_keeps_what_dispatch_keeps(monkeypatch, tokens, experts, k, capacity, count_max):
    monkeypatch.setattr(dispatch_module, "RUNNING_COUNT_MAX", count_max)  # 0: every plan counts places by sorting
    g = torch.Generator().manual_seed(tokens * experts + k)
    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])  # (T, k), distinct
    dynamic, static = dispatch(index, experts, capacity), dispatch_static(index, experts, capacity)
    kept = sum(dynamic.counts)
    assert static.keep.tolist() == [True] * kept + [False] * (tokens * k - kept)  # the kept ones come first
    assert torch.equal(static.assignment[:kept], dynamic.assignment)  # same assignments, same order
    assert torch.equal(static.token_index[:kept], dynamic.token_index)
    assert sorted(static.assignment.tolist()) == list(range(tokens * k))  # every assignment once
    assert static.counts[:-1].tolist() == dynamic.counts[:-1]
    assert int(static.counts[-1]) == dynamic.counts[-1] + tokens * k - kept  # the dropped ride last
    assert torch.equal(static.routed, dynamic.routed)
    kept_ones = set(dynamic.assignment.tolist())  # the same flags indexed by assignment (top-1: by token)
    assert static.keep_by_assignment.tolist() == [a in kept_ones for a in range(tokens * k)]


def layer(kernel: str, routing: dict, gated: bool, width: int) -> SwitchFFN:
    g = torch.Generator().manual_seed(0)
    m = SwitchFFN(width, 2 * width, RoutingConfig(kernel=kernel, **routing), nn.GELU(), gated=gated, bias=gated)
    m.router.reset_parameters(10.0, g)  # a wide router: uneven loads, so capacity drops tokens
    m.experts.reset_parameters(1.0, g)
    for b in (m.experts.b_in, m.experts.b_gate, m.experts.b_out):
        if b is not None:
            nn.init.normal_(b, generator=g)
    return m


ROUTINGS = {
    "top-1, drops": dict(num_experts=4, capacity_factor=0.5, min_capacity=1),
    "top-2 normalised, drops": dict(num_experts=4, top_k=2, normalize_gates=True, capacity_factor=0.75,
                                    min_capacity=1),
    "dropless": dict(num_experts=8, dropless=True),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("width", [16, 6])  # 6: rows too narrow for grouped_mm, the cuda kernel loops
def test_the_layer_on_the_static_plan_equals_the_host_plan(routing, gated, width):
    """Output, input gradient and every parameter gradient, with tokens dropped (which must add nothing)."""
    results = []
    for kernel in ("reference", "cuda"):
        m = layer(kernel, ROUTINGS[routing], gated, width)
        x = torch.randn(3, 7, width, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with router_losses(m) as losses:
            y = m(x)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        dropped = losses.layers[0].dropped
        results.append((y, x.grad, [p.grad for p in m.parameters()], dropped))
    (y0, gx0, gp0, d0), (y1, gx1, gp1, d1) = results
    assert d0 == d1 and (d0 > 0) == (routing != "dropless")  # the comparison covers dropping
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_a_training_step_on_the_static_plan_reads_nothing_on_the_host(routing):
    m = layer("cuda", ROUTINGS[routing], True, 16)
    x = torch.randn(4, 5, 16)
    with no_host_reads():
        with router_losses(m) as losses:
            y = m(x)
            loss = y.square().mean() + losses.total()
        loss.backward()
    assert losses.layers[0].dropped >= 0 and all(p.grad is not None for p in m.parameters())
    with pytest.raises(AssertionError, match="read on the host"), no_host_reads():
        layer("cpu", ROUTINGS[routing], True, 16)(x)  # the host plan does read: the check can fail


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_a_cuda_training_step_never_synchronises(routing):
    m = layer("auto", ROUTINGS[routing], True, 64).cuda().bfloat16()
    x = torch.randn(4, 32, 64, device="cuda", dtype=torch.bfloat16)
    m(x)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.set_sync_debug_mode("error")
    try:
        with router_losses(m) as losses:
            loss = m(x).float().square().mean() + losses.total()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
