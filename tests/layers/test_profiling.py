"""The Switch layer names its phases in torch.profiler traces, and only while a profiler records."""
import contextlib

import pytest
import torch
from torch import nn
from torch.profiler import profile

from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN, profiling
from moeify.layers.collector import router_losses

PHASES = {"moeify::router", "moeify::router_losses", "moeify::dispatch", "moeify::experts", "moeify::combine"}


def layer(kernel: str = "auto") -> nn.Module:
    m = nn.Sequential(SwitchFFN(8, 16, RoutingConfig(num_experts=4, kernel=kernel), nn.ReLU()))
    for p in m.parameters():
        nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(0))
    return m


@pytest.mark.parametrize("kernel", ["auto", "cuda"])  # cuda: the plan made on the device (static shapes)
def test_every_phase_is_named_in_a_profile(kernel):
    m, x = layer(kernel), torch.randn(2, 5, 8)
    with router_losses(m), profile() as prof:
        m(x).sum().backward()
    assert PHASES <= {e.name for e in prof.events()}


def test_no_scope_is_opened_without_a_profiler(monkeypatch):
    opened = []
    monkeypatch.setattr(profiling, "record_function", lambda name: opened.append(name) or contextlib.nullcontext())
    m = layer()
    with router_losses(m):
        m(torch.randn(2, 5, 8)).sum().backward()
    assert opened == []
    with profile():
        m(torch.randn(2, 5, 8))
    assert opened  # the same layer under a profiler asks for its scopes
