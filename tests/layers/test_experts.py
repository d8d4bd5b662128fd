import pytest
import torch
from torch import nn

from moeify.layers import Experts, grouped_linear, memory
from moeify.layers.kernels import cpu
from moeify.layers.kernels.cpu import CpuKernel

COUNTS = [3, 0, 1, 0, 0, 4, 2, 0]  # zero-count experts at the ends of runs and inside them


@pytest.fixture(params=["reference", "cuda", "span", "pairs", "each", "auto", "pairs-dnnl-pooled"])
def layout(request, monkeypatch):
    """Each kernel, and each way the cpu kernel batches experts; the last also takes the oneDNN forward and
    pools every buffer. (The cuda kernel runs grouped_mm on CPU where widths allow, else the loop.)"""
    if request.param in ("reference", "cuda"):
        return request.param
    plan, *extra = request.param.split("-")
    if extra:
        monkeypatch.setattr(memory, "_MIN_BYTES", 1)
        return CpuKernel(batching=plan, dnnl_min_rows=1)
    return CpuKernel(batching=plan)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("counts", [COUNTS, [0, 2, 0], [2, 2, 2], [0, 0, 0]])
def test_grouped_linear_gradcheck(layout, bias, counts):
    g = torch.Generator().manual_seed(0)
    e, d_in, d_out = len(counts), 3, 4
    x = torch.randn(sum(counts), d_in, dtype=torch.double, generator=g, requires_grad=True)
    w = torch.randn(e, d_out, d_in, dtype=torch.double, generator=g, requires_grad=True)
    b = torch.randn(e, d_out, dtype=torch.double, generator=g, requires_grad=True) if bias else None
    inputs = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(
        lambda x, w, b=None: grouped_linear(x, w, b, counts, layout), inputs)


def reference(ex: Experts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert loop with ordinary autograd."""
    out, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        start += n
        h = xe @ ex.w_in[e].t() + (ex.b_in[e] if ex.b_in is not None else 0)
        if ex.gated:
            h = ex.act(xe @ ex.w_gate[e].t() + (ex.b_gate[e] if ex.b_gate is not None else 0)) * h
        else:
            h = ex.act(h)
        out.append(h @ ex.w_out[e].t() + (ex.b_out[e] if ex.b_out is not None else 0))
    return torch.cat(out)


@pytest.mark.parametrize("gated,bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("counts", [COUNTS, [0, 0, 5, 0, 0, 0, 0, 0], [2] * 8])
@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU])  # the cpu kernel applies ReLU in place
def test_experts_match_per_expert_loop(layout, gated, bias, counts, act):
    g = torch.Generator().manual_seed(1)
    ex = Experts(len(counts), 6, 10, act(), gated=gated, bias=bias)
    ex.reset_parameters(1.0, g)
    params = [p for p in ex.parameters()]
    for b in (ex.b_in, ex.b_gate, ex.b_out):
        if b is not None:
            nn.init.normal_(b, generator=g)
    x = torch.randn(sum(counts), 6, generator=g, requires_grad=True)
    gy = torch.randn(sum(counts), 6, generator=g)

    y = ex(x, counts, layout)
    grads = torch.autograd.grad(y, [x, *params], gy)
    y_ref = reference(ex, x, counts)
    grads_ref = torch.autograd.grad(y_ref, [x, *params], gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for p, got, want in zip([x, *params], grads, grads_ref):
        assert got.shape == p.shape and got.is_contiguous() and not got.is_sparse
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for w, got in zip(params, grads[1:]):  # experts without rows get exactly zero
        for e, n in enumerate(counts):
            if n == 0:
                assert not got[e].any()


def _grads(ex: Experts, batches, kernel) -> dict[str, torch.Tensor]:
    """.grad of every parameter after one backward per (x, counts) batch, from no gradient."""
    ex.zero_grad(set_to_none=True)
    for x, counts in batches:
        gy = torch.randn(x.shape[0], ex.d_model, generator=torch.Generator().manual_seed(x.shape[0]))
        ex(x, counts, kernel).backward(gy)
    return {n: p.grad.clone() for n, p in ex.named_parameters()}


def _accumulation_check(ex: Experts, first, second, kernel) -> None:
    """Backward passes add up in .grad: twice one batch gives exactly twice its gradient, two
    batches the sum of their gradients; experts without rows in either batch stay exactly zero."""
    once, other = _grads(ex, [first], kernel), _grads(ex, [second], kernel)
    twice, both = _grads(ex, [first, first], kernel), _grads(ex, [first, second], kernel)
    for name, p in ex.named_parameters():
        assert once[name].abs().sum() > 0 and other[name].abs().sum() > 0, name  # not vacuous
        assert p.grad.shape == p.shape and p.grad.layout == torch.strided, name
        torch.testing.assert_close(twice[name], 2 * once[name], rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(both[name], once[name] + other[name], rtol=1e-6, atol=1e-7, msg=name)
        for e in range(ex.num_experts):
            if first[1][e] == 0:
                assert not twice[name][e].any(), f"{name}: expert {e} got no rows but has a gradient"
                if second[1][e] == 0:
                    assert not both[name][e].any(), f"{name}: expert {e} got no rows but has a gradient"


@pytest.mark.parametrize("counts, other", [([0, 3, 0, 1], [2, 0, 0, 3]), ([0, 0, 4, 0], [0, 0, 1, 0]),
                                           ([2, 0, 0, 2], [0, 5, 0, 0])])
def test_backward_accumulates_into_param_grad(layout, counts, other):
    ex = Experts(4, 4, 8, nn.ReLU(), gated=True, bias=True)
    g = torch.Generator().manual_seed(2)
    ex.reset_parameters(1.0, g)
    for b in (ex.b_in, ex.b_gate, ex.b_out):
        nn.init.normal_(b, generator=g)
    _accumulation_check(ex, (torch.randn(sum(counts), 4, generator=g), counts),
                        (torch.randn(sum(other), 4, generator=g), other), layout)


@pytest.fixture
def big(monkeypatch):
    """Shapes large enough for the huge-page gradient buffers (>= 8 MiB)."""
    monkeypatch.setattr(memory, "cache_limit_bytes", 1 << 30)
    memory.empty_cache()
    yield
    memory.empty_cache()


@pytest.mark.parametrize("layout", [CpuKernel(batching=b) for b in ("span", "pairs", "each", "auto")], ids=str)
def test_recycled_gradient_buffers_are_zeroed(layout, big):  # the pool is the cpu kernel's
    # 8 experts x 256 x 2048 floats = 16 MiB per weight: pooled buffers, 2 MiB per expert.
    ex = Experts(8, 256, 2048, nn.ReLU())
    ex.reset_parameters(1.0, torch.Generator().manual_seed(3))
    x = torch.randn(6, 256)
    for counts in ([1, 0, 2, 0, 0, 0, 3, 0], [0, 3, 0, 0, 3, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 6]):
        ex.zero_grad(set_to_none=True)  # frees the last gradients into the cache
        ex(x, counts, layout).sum().backward()
        ex.w_in.grad.add_(1.0)  # a caller may write into the buffer before it is recycled
        for e, n in enumerate(counts):
            assert bool(ex.w_in.grad[e].eq(1.0).all()) == (n == 0)
            assert bool(ex.w_out.grad[e].eq(0).all()) == (n == 0)


def test_plan_pairs_similar_counts():
    batches = cpu._plan([5, 0, 1, 4, 0, 2, 0, 0], 1 << 20)
    assert [(b.first, b.step, b.k, b.slots) for b in batches] == [(0, 3, 2, 5), (2, 3, 2, 2)]
    assert [b.row for b in batches] == [0, 10]
    (b,) = cpu._plan([3, 3, 2, 3], 1 << 20)  # even counts: one bmm over the span
    assert (b.first, b.step, b.k, b.slots) == (0, 1, 4, 3)


def test_zero_pages_only_releases_own_buffers(monkeypatch):
    calls = []
    real = memory._madvise
    monkeypatch.setattr(memory, "_madvise", lambda *a: calls.append(a[2]) or real(*a))
    ordinary = torch.ones(4, 1 << 20)
    memory.zero_pages_(ordinary[1:3])
    assert memory._MADV_DONTNEED not in calls and not ordinary[1:3].any() and ordinary[0].eq(1).all()
    own, _ = memory.empty((4, 1 << 20), torch.float32, "cpu")
    own.fill_(1.0)
    memory.zero_pages_(own[1:3])
    assert calls.count(memory._MADV_DONTNEED) == 1 and not own[1:3].any() and own[3].eq(1).all()


def test_gradient_buffer_cache():
    like = torch.empty(4, 1 << 20)  # 16 MiB
    memory.empty_cache()
    a, fresh = memory.gradient_buffer(like)
    assert fresh and a.shape == like.shape and a.is_contiguous() and not a.any()
    ptr = a.data_ptr()
    a.fill_(3.0)
    del a
    b, fresh = memory.gradient_buffer(like)
    assert not fresh and b.data_ptr() == ptr  # recycled
    memory.zero_pages_(b[1:3])
    assert b[0].eq(3).all() and not b[1:3].any() and b[3].eq(3).all()
    memory.zero_pages_(b.view(-1)[5:-7])  # unaligned ends are written
    assert b.view(-1)[:5].eq(3).all() and not b.view(-1)[5:-7].any() and b.view(-1)[-7:].eq(3).all()
    del b
    memory.empty_cache()


def test_gradient_buffer_cache_keeps_the_newest_within_its_limit(monkeypatch):
    like = torch.empty(4, 1 << 20)  # 16 MiB each
    monkeypatch.setattr(memory, "cache_limit_bytes", 2 * like.nbytes)
    memory.empty_cache()
    buffers = [memory.gradient_buffer(like)[0] for _ in range(3)]
    ptrs = [b.data_ptr() for b in buffers]
    while buffers:
        buffers.pop(0)  # freed in order: the first no longer fits once the third is back
    assert memory._cached[0] == 2 * like.nbytes
    again = [memory.gradient_buffer(like) for _ in range(3)]
    assert [(b.data_ptr(), fresh) for b, fresh in again[:2]] == [(ptrs[2], False), (ptrs[1], False)]
    assert again[2][1]  # a fresh mapping
    memory.empty_cache()


@pytest.mark.parametrize("setting, physical, limit", [(None, 24 << 30, 6 << 30), (None, 4 << 30, 2 << 30),
                                                      ("1048576", 24 << 30, 1 << 20), ("0", 24 << 30, 0),
                                                      ("lots", 24 << 30, 6 << 30)])
def test_default_cache_limit(monkeypatch, setting, physical, limit):
    # a training step's buffers must all fit (2 GiB did not: 256 experts' float32 gradients alone), bounded by memory
    if setting is None:
        monkeypatch.delenv("MOEIFY_BUFFER_CACHE_BYTES", raising=False)
    else:
        monkeypatch.setenv("MOEIFY_BUFFER_CACHE_BYTES", setting)
    sizes = {"SC_PHYS_PAGES": physical // 4096, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(memory.os, "sysconf", lambda name: sizes[name])
    if setting == "lots":
        with pytest.warns(UserWarning, match="MOEIFY_BUFFER_CACHE_BYTES='lots' is not a number of bytes"):
            assert memory._default_cache_limit() == limit
    else:
        assert memory._default_cache_limit() == limit


def test_backward_accumulates_in_pooled_gradient_buffers(big):
    # 16 MiB per weight: gradients come from the huge-page pool, and later backward passes get
    # recycled buffers, whose experts without rows must be zeroed before they are added.
    ex = Experts(8, 256, 2048, nn.ReLU())
    ex.reset_parameters(1.0, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(6)
    _accumulation_check(ex, (torch.randn(6, 256, generator=g), [1, 0, 2, 0, 0, 0, 3, 0]),
                        (torch.randn(5, 256, generator=g), [0, 5, 0, 0, 0, 0, 0, 0]),
                        CpuKernel(batching="pairs"))  # skips unused experts: they must be zeroed


def test_auto_plans_each_expert_alone_where_onednn_runs_the_gemms():
    """oneDNN runs one GEMM per expert in any plan: auto then pads nothing and copies no rows (the identity
    layout); elsewhere (no oneDNN, or a dtype it does not take) auto is the cost model's choice."""
    if cpu.dnnl_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    counts, w = [5, 0, 300, 2], torch.empty(4, 32, 16)
    layout = CpuKernel().layout(counts, w)
    assert layout.batches == [cpu._Batch(0, 1, 1, 5, 0), cpu._Batch(2, 1, 1, 300, 5), cpu._Batch(3, 1, 1, 2, 305)]
    assert layout.identity and layout.rows == 307
    modelled = cpu._plan(counts, 32 * 16, "auto")
    assert modelled != layout.batches and sum(b.k * b.slots for b in modelled) > 307  # it pads
    assert CpuKernel(dnnl=False).layout(counts, w).batches == modelled
    assert CpuKernel().layout(counts, w.double()).batches == modelled
