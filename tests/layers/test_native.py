"""The hand-written skinny GEMMs: each op against torch, reproducible bits, a silent fallback, and where the cpu
kernel takes them."""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moeify.layers import memory
from moeify.layers.kernels import cpu, grouped_linear, native
from moeify.layers.kernels.cpu import CpuKernel

_CPU = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
# The builds this CPU runs, by its own flags (not by the code under test)
HERE = [v for v, needs in (("amx", {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}), ("avx512", {"avx512f"}),
                           ("avx2", {"avx2", "fma"})) if needs <= set(_CPU)
        and (v == "avx2" or torch.backends.cpu.get_cpu_capability().startswith("AVX512"))]
BUILDABLE = bool(HERE) and shutil.which(os.environ.get("CXX") or "c++") is not None
NEEDS = "needs an AVX-512 (with or without AMX) or AVX2 CPU and a C++ compiler"
needs_native = pytest.mark.skipif(not BUILDABLE, reason=NEEDS)
MODES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
         "fp32 on bf16": (torch.float32, torch.bfloat16)}  # (activations, weights)
_KERNELS: dict = {}


@pytest.fixture(params=HERE or ["none"])
def kernel(request):
    """Each build of the kernels this CPU runs (an AMX machine tests its AVX-512 and AVX2 builds too)."""
    if not BUILDABLE:
        pytest.skip(NEEDS)
    if request.param not in _KERNELS:
        _KERNELS[request.param] = native.probe(request.param)
    assert _KERNELS[request.param] is not None and _KERNELS[request.param].variant == request.param
    return _KERNELS[request.param]


def _ops(kernel, mode, rows, out, inp, offset=0, seed=0):
    """Each op on per-expert operands starting `offset` elements past an allocation's start; (y, gx, gw) and the
    float64 products they should equal."""
    compute, dtype = MODES[mode]
    g = torch.Generator().manual_seed(seed)

    def make(*shape, dtype=compute):
        t = torch.randn(*shape, generator=g).to(dtype)
        buffer = torch.empty(t.numel() + 32, dtype=dtype)
        return buffer[offset:offset + t.numel()].view_as(t).copy_(t)

    n, top = len(rows), max(rows)
    x, w, gy = make(n, top, inp), make(n, out, inp, dtype=dtype), make(n, top, out)
    y, gx, gw = make(n, top, out), torch.empty(n, top, inp, dtype=compute), make(n, out, inp, dtype=dtype)
    r = np.array(rows, dtype=np.int64)

    def ptrs(t):
        return np.array([t[e].data_ptr() for e in range(n)], dtype=np.int64)

    kernel.run(native.FORWARD, dtype, r, ptrs(x), ptrs(w), ptrs(y), out, inp, compute)
    kernel.run(native.INPUT_GRAD, dtype, r, ptrs(gy), ptrs(w), ptrs(gx), out, inp, compute)
    kernel.run(native.WEIGHT_GRAD, dtype, r, ptrs(gy), ptrs(x), ptrs(gw), out, inp, compute)
    got, want = [], []
    for e, k in enumerate(rows):
        xd, wd, gd = x[e, :k].double(), w[e].double(), gy[e, :k].double()
        got += [y[e, :k], gx[e, :k], gw[e]]
        want += [xd @ wd.T, gd @ wd, gd.T @ xd]
    return got, want


def test_the_widest_build_this_cpu_runs_is_the_one_loaded():
    assert (native.skinny() and native.skinny().variant) == (HERE[0] if BUILDABLE else None)


@pytest.mark.parametrize("mode", list(MODES))
# blocks of 4 / 6 rows (8 streamed): whole, partial, none (1, 2, 5: an expert of fewer rows than a block); AMX
# tiles of 16 rows, 64 per pass: a second pass; the AVX-512 input gradient's partial sums in spans of columns (from 17
# rows), and in two groups of rows (over 256); the AMX input gradient's 2 x 2 blocks (from 32 rows: pairs of 16 rows and
# a single 16 last, partial); the AVX-512 float32 forward's outer products and weight gradient's laid-out operands (from
# 16 rows; the forward: a chunk of 64 rows and a partial one, 70 and 260; a tail of 1-4 rows as dot products after one
# or two whole vectors: 17, 18, 20, 35); the bfloat16 weight gradient on rows in pairs (AVX-512 without tiles), an odd
# count's last pair half zero, and its input gradient on pairs of weight rows (widths a multiple of 32 below: chunks of
# one group of 32 columns at 32, of two at 64 and 2048; the other widths take the widened loops); its forward as outer
# products on pairs (from 25 rows, inputs a multiple of 32 up to 1,024: 32, 64, 96; whole vectors at 48, tails of 1-8
# rows as dot products at 33, 35, 70, 88 and 260, the last two beside chunks of 64 rows and a partial one; blocks of
# 6-8 weight rows with 4 (112) and 2 left)
@pytest.mark.parametrize("rows", [[1], [6, 7], [13, 0, 2], [48, 5], [70, 17], [260, 1], [20, 35, 18], [33, 88]])
# column tails of the blocks; in > 1024: the input gradient in two units (streamed, or in runs); 272 x 2048: the
# forward's units of 1 MB of weight (128 or 256 rows), the last one partial; out > in (AMX:
# 2 x 2 blocks of tiles) in units of 128 rows with pairs of 16 and a single 16 last; the outer products' pieces of 128
# inputs, the last one partial (1040), and blocks of 6-8 weight rows with 4 and 2 left (96, 272)
@pytest.mark.parametrize("out, inp", [(16, 16), (48, 80), (64, 32), (96, 48), (32, 208), (16, 1040), (272, 2048),
                                      (80, 64), (272, 64), (112, 96)])
def test_each_op_equals_the_product_up_to_rounding(kernel, mode, rows, out, inp):
    got, want = _ops(kernel, mode, rows, out, inp)
    for a, e in zip(got, want):
        # float32 sums in another order than float64; bfloat16 rounds the result once (8 bits of mantissa)
        tolerance = 1e-5 if a.dtype == torch.float32 else 8e-3
        assert a.shape == e.shape
        if a.numel():
            assert (a.double() - e).abs().max() <= tolerance * max(e.abs().max().item(), 1.0)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("out, inp", [(48, 96), (96, 64)])  # AMX: streamed whole lines where y is aligned
def test_the_bits_depend_on_neither_alignment_nor_threads(kernel, mode, out, inp):
    """Each output element is summed in a fixed order of indices: where operands lie, and how many threads share the
    work, change nothing."""
    want, _ = _ops(kernel, mode, [7, 3, 16, 40, 60, 18, 36], out, inp)
    threads = torch.get_num_threads()
    try:
        for offset in (1, 3, 8, 15):
            for count in (1, 3):
                torch.set_num_threads(count)
                got, _ = _ops(kernel, mode, [7, 3, 16, 40, 60, 18, 36], out, inp, offset)
                assert all(torch.equal(a, e) for a, e in zip(got, want)), (offset, count)
    finally:
        torch.set_num_threads(threads)


def test_released_buffers_are_freed_and_laid_out_again(kernel, monkeypatch):
    """The operands a call lays out stay for the next call until release() (or memory.empty_cache()) frees them;
    the call after that lays them out afresh and computes the same bits."""
    want, _ = _ops(kernel, "fp32", [40, 24], 64, 32)
    kernel.release()
    assert kernel.release() == 0  # nothing left to free
    got, _ = _ops(kernel, "fp32", [40, 24], 64, 32)
    assert all(torch.equal(a, e) for a, e in zip(got, want))
    # AVX-512 builds lay out float32 operands from 16 rows (the outer products); AVX2 builds read them in place
    assert (kernel.release() > 0) == (kernel.variant != "avx2")
    _ops(kernel, "fp32", [40, 24], 64, 32)
    monkeypatch.setattr(native, "_LOADED", [kernel])
    memory.empty_cache()
    assert kernel.release() == 0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("start, nbytes", [(0, 0), (5, 3), (1, 64), (0, 64), (13, 3 << 20), (64, (3 << 20) + 7)])
def test_zero_writes_zeros_over_exactly_the_tensor(kernel, start, nbytes, threads):
    """Streamed zeros from any address, over partial lines at either end, whole lines and megabytes split between
    threads; the bytes either side keep their values."""
    g = torch.Generator().manual_seed(0)
    buffer = torch.randint(1, 256, (start + nbytes + 70,), dtype=torch.uint8, generator=g)
    before = buffer.clone()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    part = buffer[start:start + nbytes]
    try:
        assert kernel.zero_(part) is part
    finally:
        torch.set_num_threads(previous)
    assert not buffer[start:start + nbytes].any()
    assert torch.equal(buffer[:start], before[:start]) and torch.equal(buffer[start + nbytes:], before[start + nbytes:])


def test_bad_sizes_are_refused_not_computed(kernel):
    rows, empty = np.array([1], dtype=np.int64), np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="refused op 0 with out=24, in=16"):
        kernel.run(native.FORWARD, torch.float32, rows, empty, empty, empty, 24, 16)


@pytest.mark.parametrize("torch_says, builds", [(True, ["amx", "avx512", "avx2"]), (False, ["avx512", "avx2"]),
                                                (AttributeError, ["amx", "avx512", "avx2"]),
                                                (RuntimeError, ["amx", "avx512", "avx2"])])
def test_the_amx_build_is_tried_where_torch_reports_tiles_or_cannot_say(monkeypatch, torch_says, builds):
    """torch's AMX check is private: missing or failing, the AMX library is still tried, and its own check of the CPU
    and of the kernel's leave to use the tiles decides."""
    def check():
        if isinstance(torch_says, bool):
            return torch_says
        raise torch_says("no such check")

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", check, raising=False)
    native.torch_reports_amx.cache_clear()
    cpu.instruction_set.cache_clear()
    assert native.candidates() == builds
    # the tables tuned per machine class take the AMX ones only where torch says so
    assert cpu.instruction_set() == ("amx" if torch_says is True else "avx512")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpu.instruction_set.cache_clear()
    assert native.candidates() == ["avx2"] and cpu.instruction_set() == "avx2"
    native.torch_reports_amx.cache_clear()  # the next test sees this machine's own answer
    cpu.instruction_set.cache_clear()


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEIFY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LOADED", [])
    return tmp_path / "cache"


@pytest.mark.parametrize("how", ["no compiler", "compiler fails", "wrong result"])
def test_without_the_kernels_the_cpu_kernel_falls_back_silently(monkeypatch, fresh_cache, how):
    """No compiler, a compiler that fails, or a library that computes something else: no native kernels, no
    half-built file in the cache, and the cpu kernel's results still equal the reference's."""
    if how == "no compiler":
        monkeypatch.setenv("CXX", "/nonexistent/c++")
    elif how == "compiler fails":
        monkeypatch.setenv("CXX", shutil.which("false"))
    else:
        monkeypatch.setattr(native, "_correct", lambda kernel: False)
    assert native.probe() is None
    assert not [p for p in fresh_cache.glob("*") if p.name.endswith(".tmp")]
    x, w = torch.randn(5, 16), torch.randn(3, 32, 16)
    y = grouped_linear(x, w, None, [2, 0, 3], CpuKernel())
    assert native._LOADED == [None]
    torch.testing.assert_close(y, grouped_linear(x, w, None, [2, 0, 3], "reference"))


@needs_native
def test_a_build_is_kept_and_reused(monkeypatch, fresh_cache):
    first = native.build(HERE[0])
    assert first is not None and first.parent == fresh_cache and first.name.startswith(f"skinny-{HERE[0]}-")

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiling)
    assert native.build(HERE[0]) == first
    assert native.probe(HERE[0]) is not None


@needs_native
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("out, inp", [(64, 32), (32, 64)])  # each op's limit depends on the shape (out > in or not)
def test_the_cpu_kernel_takes_them_for_few_rows_per_expert(monkeypatch, mode, out, inp):
    """Each op runs natively exactly for the experts within its row limit (native_max_rows) for the loaded build and
    the pair of dtypes (none without an entry), and the layer's output and gradients equal those of the cpu kernel
    without them, up to rounding. "fp32 on bf16" is bfloat16 with float32 compute (upcast)."""
    compute, dtype = MODES[mode]
    upcast = compute != dtype
    # the build first: its load-time probe runs the ops too, and is not what this test counts
    limits = cpu.native_max_rows(native.skinny(), compute, dtype, out, inp)
    calls = []
    real = native.Skinny.run
    monkeypatch.setattr(native.Skinny, "run", lambda self, op, dt, rows, *a: calls.append((op, sorted(rows)))
                        or real(self, op, dt, rows, *a))
    counts = [2, 0, 7, 30, 60, 330, 5, 5]  # pairs of 330, 30, 5 and 2 slots: each mode's limits split them
    g = torch.Generator().manual_seed(0)
    n = sum(counts)
    x, w, gy = (torch.randn(*s, generator=g).to(dtype) for s in ((n, inp), (8, out, inp), (n, out)))

    def step(kernel):
        leaves = [t.detach().requires_grad_() for t in (x, w)]
        grouped_linear(*leaves, None, counts, kernel).backward(gy)
        return [leaves[0].grad, leaves[1].grad]

    slots = sorted(b.slots for b in cpu._plan(counts, out * inp, "pairs") for _ in range(b.k))
    with_native = step(CpuKernel(batching="pairs", upcast=upcast))
    expected = [(op, [s for s in slots if s <= limits[op]]) for op in (native.FORWARD, native.INPUT_GRAD,
                                                                       native.WEIGHT_GRAD)]
    assert calls == [(op, s) for op, s in expected if s]
    calls.clear()
    without = step(CpuKernel(batching="pairs", native=False, upcast=upcast))
    assert calls == []
    for a, e in zip(with_native, without):
        torch.testing.assert_close(a, e, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-4)


DROPOUT_DTYPES = [torch.float32, torch.bfloat16]


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _keep(seed: int, n: int, p: float) -> torch.Tensor:
    """The mask skinny.cpp documents, written again in numpy: a hash of the seed and each element's index."""
    i = np.arange(n, dtype=np.uint32)
    low, high = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    with np.errstate(over="ignore"):
        h = _fmix32(_fmix32(i ^ low) + high)
    return torch.from_numpy(h.astype(np.int64) >= min(round(p * 2 ** 32), 2 ** 32 - 1))


@pytest.mark.parametrize("dtype", DROPOUT_DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_the_op_is_relu_then_the_documented_mask_scaled_by_one_over_keep(kernel, dtype, p):
    h = torch.randn(3000, 16).to(dtype)
    h[0, :3] = torch.tensor([float("nan"), 0.0, -0.0])
    y = torch.empty_like(h)
    kernel.relu_dropout(native.RELU_DROPOUT, h, None, y, p, seed=0x1234_5678_9ABC)
    keep = _keep(0x1234_5678_9ABC, h.numel(), p).view_as(h)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    want = torch.where(keep, torch.relu(h).float() * scale, torch.relu(h).float() * 0).to(dtype)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    assert y[0, 0].isnan()  # NaN stays NaN, kept or not, as in torch's relu and dropout
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01


@pytest.mark.parametrize("dtype", DROPOUT_DTYPES)
def test_its_mask_depends_on_the_seed_only_not_on_threads_or_place(kernel, dtype):
    h = torch.randn(1 << 16).to(dtype)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count, offset in ((1, 0), (2, 3), (3, 1)):
            torch.set_num_threads(count)
            buffer = torch.empty(h.numel() + 8, dtype=dtype)
            y = buffer[offset:offset + h.numel()]
            kernel.relu_dropout(native.RELU_DROPOUT, h, None, y, 0.3, seed=7)
            runs.append(y.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, runs[0]) for r in runs)
    other = torch.empty_like(h)
    kernel.relu_dropout(native.RELU_DROPOUT, h, None, other, 0.3, seed=8)
    assert not torch.equal((other != 0), (runs[0] != 0))


@pytest.mark.parametrize("dtype", DROPOUT_DTYPES)
def test_the_gradient_passes_where_the_output_is_positive(kernel, dtype):
    h, g = torch.randn(4096).to(dtype), torch.randn(4096).to(dtype)
    y, gh = torch.empty_like(h), torch.empty_like(h)
    kernel.relu_dropout(native.RELU_DROPOUT, h, None, y, 0.25, seed=3)
    kernel.relu_dropout(native.RELU_DROPOUT_GRAD, g, y, gh, 0.25)
    scale = torch.tensor(1 / 0.75, dtype=torch.float32)
    assert torch.equal(gh, torch.where(y > 0, g.float() * scale, 0.0).to(dtype))


@pytest.mark.parametrize("dtype", DROPOUT_DTYPES)
def test_relu_without_dropout_and_its_gradient_equal_torchs(kernel, dtype):
    """RELU in place and RELU_GRAD, what the cpu kernel runs for bfloat16 hiddens without dropout, against torch's relu
    and threshold_backward: specials included (a NaN output passes its gradient, as in torch)."""
    h, g = torch.randn(5000).to(dtype), torch.randn(5000).to(dtype)
    h[:6] = torch.tensor([float("nan"), -float("nan"), 0.0, -0.0, float("inf"), -float("inf")])
    want = torch.relu(h)
    y = h.clone()
    kernel.relu_dropout(native.RELU, y, None, y, 0.0)
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
    assert not y.signbit()[2:].any()  # -0 and negatives become +0
    gh = torch.empty_like(g)
    kernel.relu_dropout(native.RELU_GRAD, g, y, gh, 0.0)
    assert torch.equal(gh, torch.ops.aten.threshold_backward(g, want, 0))
    assert gh[0] == g[0] and gh[2] == 0 and gh[4] == g[4]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 32, 32), (3, 70, 45), (2, 130, 64), (1, 1154, 96), (2, 0, 5), (1, 1, 33)])
def test_transpose_lays_out_each_matrix_transposed(kernel, shape, dtype, threads):
    """Every matrix of a batch transposed, in whole 32 x 32 pieces and the partial ones at both edges; nothing
    written past the destination."""
    src = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    batches, rows, cols = shape
    buffer = torch.full((batches * rows * cols + 40,), 7, dtype=dtype)
    dst = buffer[:batches * rows * cols].view(batches, cols, rows)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert kernel.transpose(src, dst) is dst
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(dst, src.transpose(1, 2)) and bool((buffer[dst.numel():] == 7).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("tokens, experts, width", [(70, 8, 512), (5, 3, 32), (0, 16, 64), (33, 1, 96)])
def test_the_router_logits_and_gradients_match_float64_in_the_same_bits_on_any_threads(kernel, dtype, tokens, experts,
                                                                                         width):
    """x @ w.T from x as it lies (bfloat16 or float32) in float32, grad @ w in x's dtype and grad.T @ x in float32:
    within float32's rounding of float64's sums, and the same bits on one thread as on two."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g).to(dtype)
    w, grad = torch.randn(experts, width, generator=g), torch.randn(tokens, experts, generator=g)
    previous, runs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append((kernel.router_logits(x, w), *kernel.router_grads(grad, x, w, True, True)))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    logits, gx, gw = runs[0]
    x64, w64, g64 = x.double(), w.double(), grad.double()
    # sums of up to 512 products of unit size: float32 keeps them to about 1e-4
    torch.testing.assert_close(logits.double(), x64 @ w64.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gx, (g64 @ w64).to(dtype), rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-4)
    torch.testing.assert_close(gw.double(), g64.T @ x64, rtol=1e-5, atol=1e-4)
    assert gx.dtype == dtype and logits.dtype == gw.dtype == torch.float32
    assert kernel.router_grads(grad, x, w, False, True)[0] is None
    assert kernel.router_grads(grad, x, w, True, False)[1] is None


def test_the_router_refuses_too_many_experts_or_a_ragged_width(kernel):
    with pytest.raises(ValueError, match=r"refused the router's logits for \(17, 64\)"):
        kernel.router_logits(torch.zeros(4, 64), torch.zeros(17, 64))
    with pytest.raises(ValueError, match=r"refused the router's gradients for \(8, 40\)"):
        kernel.router_grads(torch.zeros(4, 8), torch.zeros(4, 40), torch.zeros(8, 40), True, True)
