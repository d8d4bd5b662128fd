"""The experts' ReLU + dropout in the cpu kernel: the native one-pass op where it runs (its own tests are in
test_native.py), torch's dropout where it does not."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.layers.kernels import native
from moeify.layers.kernels.cpu import CpuKernel, CpuLayout
from tests.layers.test_native import needs_native

DTYPES = [torch.float32, torch.bfloat16]


def _layout(kernel: CpuKernel, counts: list[int]) -> CpuLayout:
    return kernel.layout(counts, torch.empty(len(counts), 16, 32))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cpu_layout_runs_it_in_place_with_torchs_seed_and_autograd(dtype):
    """relu(h, p) on a kernel output: in place, repeatable under torch.manual_seed, and its gradient is ReLU's times
    dropout's (the incoming gradient scaled where the output is positive)."""
    layout = _layout(CpuKernel(), [5, 0, 11, 7])
    x, w = torch.randn(layout.rows, 32, dtype=dtype), torch.randn(4, 64, 32, dtype=dtype, requires_grad=True)

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)
        h = layout.linear(x, w, None)
        address = h.data_ptr()
        y = layout.relu(h, 0.5)
        assert y.data_ptr() == address  # in place: no second hidden-sized buffer
        return y, h

    y, _ = run(0)
    assert torch.equal(run(0)[0], y) and not torch.equal(run(1)[0], y)
    g = torch.randn_like(y)
    w.grad = None
    y.backward(g)
    # what plain autograd gives with the same mask: relu, then multiply by (kept / (1 - p))
    keep = (y != 0).to(dtype) * 2
    w2 = w.detach().clone().requires_grad_()
    plain = torch.relu(layout.linear(x, w2, None)) * keep
    assert torch.equal(plain.detach(), y.detach())
    plain.backward(g)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("dtype, p, ops", [
    (torch.float32, 0.1, [native.RELU_DROPOUT, native.RELU_DROPOUT_GRAD]),
    (torch.bfloat16, 0.1, [native.RELU_DROPOUT, native.RELU_DROPOUT_GRAD]),
    (torch.bfloat16, 0.0, [native.RELU, native.RELU_GRAD]),  # torch's bfloat16 relu_ widens every element
    (torch.float32, 0.0, []),  # torch's float32 relu_ is as fast
])
def test_the_native_op_is_what_the_layout_uses(monkeypatch, dtype, p, ops):
    calls, original = [], native.Skinny.relu_dropout

    def spy(self, op, *args, **kwargs):
        calls.append(op)
        return original(self, op, *args, **kwargs)

    monkeypatch.setattr(native.Skinny, "relu_dropout", spy)
    layout = _layout(CpuKernel(), [3, 4])
    x, w = torch.randn(layout.rows, 32, dtype=dtype), torch.randn(2, 64, 32, dtype=dtype, requires_grad=True)
    h = layout.linear(x, w, None)
    y = layout.relu(h, p)
    g = torch.randn_like(y)
    y.backward(g)
    assert calls == ops
    if not p:  # ReLU's own output and gradient, whichever ran them
        w2 = w.detach().clone().requires_grad_()
        plain = torch.relu(layout.linear(x, w2, None))
        assert torch.equal(plain.detach(), y.detach())
        plain.backward(g)
        assert torch.equal(w.grad, w2.grad)


@pytest.mark.parametrize("counts, kernel_args", [([12], {}), ([3, 4], {"native": False})])
def test_one_expert_and_no_native_loops_keep_torchs_dropout(counts, kernel_args):
    """One expert taking every row draws torch's own masks (a conversion to one expert keeps the dense model's
    training-mode outputs for a seed), and so does a kernel without the native loops."""
    layout = _layout(CpuKernel(**kernel_args), counts)
    x, w = torch.randn(layout.rows, 32), torch.randn(len(counts), 64, 32)
    h = layout.linear(x, w, None)
    want = h.detach().clone()
    torch.manual_seed(4)
    got = layout.relu(h, 0.3)
    torch.manual_seed(4)
    assert torch.equal(got, F.dropout(torch.relu(want), 0.3, training=True))


@pytest.mark.parametrize("p, training", [(0.0, True), (0.4, False), (1.0, True)])
def test_no_dropout_in_eval_or_at_zero_and_all_dropped_at_one(p, training):
    layer = SwitchFFN(32, 64, RoutingConfig(num_experts=4, capacity_factor=4.0), nn.ReLU(), dropout=p)
    layer.router.reset_parameters(1.0)  # a new layer's parameters are uninitialised until a conversion sets them
    layer.experts.reset_parameters(1.0)
    layer.train(training)
    x = torch.randn(40, 32)
    out = layer(x)
    if p == 1.0:
        assert torch.equal(out, torch.zeros_like(out))
    else:
        layer.experts.dropout.p = 0.0
        assert torch.equal(out, layer(x))
