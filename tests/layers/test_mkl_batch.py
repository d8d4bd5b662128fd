"""MKL's batched GEMM (kernels/mkl.py): its products, where the cpu kernel hands it experts, and its silent absence."""
import pytest
import torch

from moeify.layers.kernels import cpu, grouped_linear, mkl
from moeify.layers.kernels.cpu import CpuKernel

needs_mkl = pytest.mark.skipif(mkl.function() is None, reason="this torch exports no MKL batched GEMM")


@needs_mkl
def test_a_batch_of_products_of_many_shapes_equals_torch_mm():
    """Groups of equal shapes and lone ones, both kinds of product, rows of wider tensors (leading dimensions larger
    than the width): each result equals torch.mm's on the same operands."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(300, 80, generator=g)
    w = torch.randn(5, 24, 40, generator=g)
    out = torch.zeros(300, 64)
    cases = [(wide[0:30, :40], w[0], out[0:30, :24], True), (wide[30:60, :40], w[1], out[30:60, :24], True),
             (wide[60:61, :40], w[2], out[60:61, :24], True), (wide[100:117, :24], w[3], out[100:117, :40], False),
             (wide[120:250, 10:34], w[4], out[120:250, 20:60], False)]
    batch = mkl.GemmBatch(mkl.function())
    for a, b, c, transpose in cases:
        batch.add(a, b, c, transpose_b=transpose)
    batch.run()
    for a, b, c, transpose in cases:
        torch.testing.assert_close(c, a @ (b.t() if transpose else b), rtol=1e-5, atol=1e-5)
    assert not out[61:100].any() and not out[250:].any()  # nothing written outside the results


def test_fewer_products_than_a_batch_wants_run_one_mm_each():
    def refuse(*args):
        raise AssertionError("batched call with too few products")

    a, b = torch.randn(9, 6), torch.randn(4, 6)
    c = torch.empty(9, 4)
    batch = mkl.GemmBatch(refuse, fewest=2)
    batch.add(a, b, c, transpose_b=True)
    batch.run()
    torch.testing.assert_close(c, a @ b.t())


@pytest.mark.parametrize("fault", ["no symbol", "no library", "wrong results"])
def test_the_probe_falls_back_silently(monkeypatch, fault):
    """A torch without MKL's batched GEMM, or one that computes something else: no batching, the same results."""
    if fault == "no symbol":
        monkeypatch.setattr(mkl, "SYMBOL", "no_such_gemm")
    elif fault == "no library":
        monkeypatch.setattr(mkl, "LIBRARY", {})
    else:
        monkeypatch.setattr(mkl, "_exported", lambda: lambda *args: None)  # returns, writes nothing
    assert mkl.probe() is None
    monkeypatch.setattr(mkl, "_PROBED", [])  # probed again on next use, under the patch
    monkeypatch.setattr(cpu, "instruction_set", lambda: "amx")
    assert CpuKernel().mkl_batch_for(torch.float32, torch.float32, torch.device("cpu")) is None
    assert mkl._PROBED == [None]
    x, w, b = torch.randn(100, 13), torch.randn(2, 30, 13), torch.randn(2, 30)
    torch.testing.assert_close(grouped_linear(x, w, b, [70, 30], CpuKernel(native=False)),
                               grouped_linear(x, w, b, [70, 30], "reference"))


@needs_mkl
@pytest.mark.parametrize("out, inp", [(30, 13), (13, 30)])  # out > in: its input gradient batched too; out < in: not
def test_the_cpu_kernel_batches_mkl_experts_where_it_pays(monkeypatch, out, inp):
    """On the AMX machine class, float32 experts that MKL would run one per call (from oneDNN's 64 rows, below
    MKL_BATCH_ROWS) go into one batched call: the forward's, and the input gradient's where out > in (outside
    oneDNN's 3-16 rows); other experts and the weight gradient keep their paths. Output and gradients (with biases)
    equal the reference's."""
    monkeypatch.setattr(cpu, "instruction_set", lambda: "amx")
    monkeypatch.setattr(cpu, "MKL_BATCH_MIN_EXPERTS", 2)  # the batched call, not its fallback, with a few experts
    added, runs = [], []
    real_run = mkl.GemmBatch._batched
    monkeypatch.setattr(mkl.GemmBatch, "_batched", lambda self: runs.append(len(self._items)) or real_run(self))
    real = mkl.GemmBatch.add
    monkeypatch.setattr(mkl.GemmBatch, "add",
                        lambda self, a, b, c, transpose_b: added.append((a.shape[0], transpose_b)) or
                        real(self, a, b, c, transpose_b))
    counts = [70, 0, 600, 20, 2, 100]  # forward: 70, 100 batched (600 above the limit); input gradient: all but 600
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(len(counts), out, inp, generator=g), torch.randn(len(counts), out, generator=g)
    x, gy = torch.randn(sum(counts), inp, generator=g), torch.randn(sum(counts), out, generator=g)

    def step(kernel):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        y = grouped_linear(*leaves, counts, kernel)
        y.backward(gy)
        return [y, *(t.grad for t in leaves)]

    got, want = step(CpuKernel(native=False)), step("reference")
    forward = sorted(rows for rows, transpose in added if transpose)
    input_grad = sorted(rows for rows, transpose in added if not transpose)
    assert forward == [70, 100]
    assert input_grad == ([2, 20, 70, 100] if out > inp else [])
    assert runs == ([2, 4] if out > inp else [2])
    for a, e in zip(got, want):
        torch.testing.assert_close(a.detach(), e.detach(), rtol=1e-5, atol=1e-5 * e.abs().max().item())
    added.clear()
    step(CpuKernel(native=False, mkl_batch=False))
    assert added == []


@needs_mkl
@pytest.mark.parametrize("machine, compute, weights, batched", [
    ("amx", torch.float32, torch.float32, True),
    ("amx", torch.bfloat16, torch.bfloat16, False),  # bfloat16 GEMMs are oneDNN's on the tiles there
    ("amx", torch.float32, torch.bfloat16, False),  # float32 compute on bfloat16 weights widens them per expert
    ("avx512", torch.float32, torch.float32, False),  # oneDNN takes every float32 GEMM there (DNNL_ROWS)
    ("avx2", torch.float32, torch.float32, False),  # not measured there: MKL takes float32 only from 512 rows
])
def test_the_batch_runs_only_where_it_was_measured_to_pay(monkeypatch, machine, compute, weights, batched):
    monkeypatch.setattr(cpu, "instruction_set", lambda: machine)
    rows = CpuKernel().mkl_batch_for(compute, weights, torch.device("cpu"))
    assert rows == (cpu.MKL_BATCH_ROWS["amx"][torch.float32] if batched else None)
    assert CpuKernel(mkl_batch=False).mkl_batch_for(compute, weights, torch.device("cpu")) is None
