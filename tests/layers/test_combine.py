"""The gated combine: its pooled autograd node computes what the plain ops compute, bit for bit, gradients included."""
import pytest
import torch

from moeify.layers import memory
from moeify.layers.combine import gated_combine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["copy", "add", "identity"])
def test_pooled_node_equals_plain_ops(monkeypatch, dtype, form):
    monkeypatch.setattr(memory, "_MIN_BYTES", 1)  # every temporary from the recycled buffers
    memory.empty_cache()
    g = torch.Generator().manual_seed(3)
    tokens, rows, d = 9, 7, 16
    if form == "identity":
        rows, index = tokens, None
    elif form == "copy":
        index = torch.randperm(tokens, generator=g)[:rows]  # two tokens dropped: their rows must be zero
    else:
        index = torch.randint(0, tokens, (rows,), generator=g)  # repeats: a token sums its choices
    y0 = torch.randn(rows, d, generator=g).to(dtype)
    gate0 = torch.rand(rows, generator=g).to(dtype)
    upstream = torch.randn(tokens, d, generator=g).to(dtype)
    results = []
    for pool in (False, True):
        y, gate = y0.clone().requires_grad_(), gate0.clone().requires_grad_()
        out = gated_combine(y, gate, index, tokens, accumulate=form == "add", pool=pool)
        out.backward(upstream)
        results.append((out.detach(), y.grad, gate.grad, out.grad_fn.name()))
    (plain, plain_gy, plain_gg, plain_node), (pooled, pooled_gy, pooled_gg, pooled_node) = results
    assert "PooledGatedCombine" in pooled_node and "PooledGatedCombine" not in plain_node
    assert memory._live or memory._free  # the pooled run took its buffers from the cache
    assert torch.equal(pooled, plain) and torch.equal(pooled_gy, plain_gy) and torch.equal(pooled_gg, plain_gg)
    expected = torch.zeros(tokens, d, dtype=torch.float64)
    if index is None:
        expected = y0.double() * gate0.double()[:, None]
    else:
        expected.index_add_(0, index, y0.double() * gate0.double()[:, None])
    torch.testing.assert_close(plain.double(), expected, rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # without autograd the pooled arithmetic runs without its node: the same bits
        unrecorded = gated_combine(y0, gate0, index, tokens, accumulate=form == "add", pool=True)
    assert unrecorded.grad_fn is None and torch.equal(unrecorded, pooled)
    if form == "copy":
        dropped = torch.ones(tokens, dtype=torch.bool)
        dropped[index] = False
        assert bool(pooled[dropped].eq(0).all())
    memory.empty_cache()


def test_pooled_copy_leaves_dropped_tokens_exactly_zero_next_to_infinite_rows(monkeypatch):
    """The pooled copy gathers each token's row and multiplies by its gate: a dropped token is written zeros after
    that, so an infinite or NaN expert output elsewhere (0 x inf) never reaches the rows the residual carries."""
    monkeypatch.setattr(memory, "_MIN_BYTES", 1)
    memory.empty_cache()
    y = torch.ones(3, 4)
    y[0], y[2] = float("inf"), float("nan")
    gate, index = torch.tensor([0.5, 0.25, 2.0]), torch.tensor([4, 1, 3])  # tokens 0 and 2 dropped
    with torch.no_grad():
        pooled = gated_combine(y, gate, index, 5, pool=True)
        plain = gated_combine(y, gate, index, 5, pool=False)
    assert torch.equal(pooled[[0, 2]], torch.zeros(2, 4)) and torch.equal(pooled[[1, 4]], plain[[1, 4]])
    assert bool(pooled[3].isnan().all()) and bool(plain[3].isnan().all())
    memory.empty_cache()
