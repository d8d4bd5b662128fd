"""The expert kernels: every pair of backends agrees on outputs and all gradients; each is chosen by config."""
import itertools
import warnings

import pytest
import torch
from torch import nn

from moeify.config import MoEConfig, RoutingConfig
from moeify.errors import MoeifyError
from moeify.layers import Experts, SwitchFFN, memory
from moeify.layers.kernels import cpu, cuda, get_kernel, grouped_linear, native
from moeify.layers.kernels.cpu import CpuKernel

BACKENDS = ["reference", "cpu", "cuda"]  # cuda: grouped_mm runs on CPU too, so its logic is tested here
# Widths a multiple of 16 bytes in bf16 and float32, so the cuda kernel takes grouped_mm, not its fallback.
D_MODEL, D_FF = 16, 32
CASES = {  # counts per expert
    "empty experts": [3, 0, 5, 0, 1, 0, 0, 7],
    "one expert": [9],
    "all in one of four": [0, 0, 6, 0],
    "no rows": [0, 0, 0],
}
# Largest difference, relative to the tensor's largest magnitude: bf16 keeps 8 bits of mantissa, fp16 11, and backends
# accumulate in different orders.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def run(kernel, counts, gated, bias, dtype, act=nn.GELU, widths=(D_MODEL, D_FF), device="cpu"):
    """Output and every gradient (input and parameters) of one Experts forward + backward, seeded (drawn on the CPU,
    then moved to `device`), on the CPU."""
    g = torch.Generator().manual_seed(0)
    d_model, d_ff = widths
    ex = Experts(len(counts), d_model, d_ff, act(), gated=gated, bias=bias)
    ex.reset_parameters(1.0, g)
    for b in (ex.b_in, ex.b_gate, ex.b_out):
        if b is not None:
            nn.init.normal_(b, generator=g)
    ex.to(device, dtype)
    x = torch.randn(sum(counts), d_model, generator=g).to(device, dtype).requires_grad_()
    gy = torch.randn(sum(counts), d_model, generator=g).to(device, dtype)
    y = ex(x, counts, kernel)
    params = [x, *ex.parameters()]
    grads = torch.autograd.grad(y, params, gy, allow_unused=True) if y.numel() else [None] * len(params)
    return [None if t is None else t.cpu() for t in (y, *grads)]


def assert_agree(a, b, dtype):
    for i, (got, want) in enumerate(zip(a, b)):
        if got is None or want is None:  # no rows at all: nothing flows back
            assert got is None or not got.any(), i
            assert want is None or not want.any(), i
            continue
        assert got.shape == want.shape, i
        if not want.numel():
            continue
        error = (got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)
        assert error <= TOLERANCE[dtype], (i, float(error))


@pytest.mark.parametrize("first, second", list(itertools.combinations(BACKENDS, 2)))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gated, bias", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", [nn.GELU, nn.ReLU])  # ReLU: the cpu layout's own, in place, its gradient pooled
def test_every_pair_of_backends_agrees(first, second, case, gated, bias, dtype, act):
    counts = CASES[case]
    assert_agree(run(first, counts, gated, bias, dtype, act), run(second, counts, gated, bias, dtype, act), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gated, bias", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_cuda_kernel_on_a_gpu_agrees_with_the_reference(case, gated, bias, dtype):
    """grouped_mm on the GPU itself (bfloat16: its fused kernel; float16: torch's fallback loop), against the
    reference loop on the CPU."""
    counts = CASES[case]
    assert_agree(run("cuda", counts, gated, bias, dtype, device="cuda"), run("reference", counts, gated, bias, dtype),
                 dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relu_experts_with_pooled_buffers_agree_with_the_reference(dtype):
    """Widths large enough that the cpu kernel's outputs and ReLU's gradient come from the huge-page pool."""
    # (970, 2048) float32 activations: 7.9 MB, above the pool's floor. Every expert has more rows than any build's
    # native forward takes where out > in (AMX, bfloat16: 256): a hidden summed in another order than the reference's
    # flips ReLU's mask where it rounds across zero, which moves bfloat16 gradients by up to 20 % (the native ops' own
    # accuracy is test_native's).
    counts, widths = [400, 0, 300, 270], (64, 2048)
    got, want = run("cpu", counts, False, True, dtype, nn.ReLU, widths), \
        run("reference", counts, False, True, dtype, nn.ReLU, widths)
    for i, (a, b) in enumerate(zip(got, want)):
        error = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert error <= TOLERANCE[dtype], (i, float(error))


def test_the_cuda_kernel_takes_grouped_mm_when_widths_allow(monkeypatch):
    calls = []
    real = cuda.F.grouped_mm
    monkeypatch.setattr(cuda.F, "grouped_mm", lambda *a, **kw: calls.append(kw["offs"].tolist()) or real(*a, **kw))
    x, w = torch.randn(6, 16), torch.randn(3, 8, 16)
    grouped_linear(x, w, None, [2, 0, 4], "cuda")
    assert calls == [[2, 2, 6]]  # one call, the experts' end rows on the device
    grouped_linear(torch.randn(6, 3), torch.randn(3, 8, 3), None, [2, 0, 4], "cuda")  # 12-byte rows: the loop
    assert len(calls) == 1


@pytest.mark.parametrize("counts", [[70], [0, 0, 70, 0]], ids=["one expert", "all in one of four"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype, upcast", [(torch.float32, None), (torch.bfloat16, True)], ids=["fp32", "bf16 widened"])
def test_one_expert_taking_every_row_runs_its_gemms_alone(counts, bias, dtype, upcast):
    """Without oneDNN (as from 64 rows on AMX), one expert with every row takes one mm per GEMM, outside the plan's
    batches: the reference's results, and with E = 1 the dense F.linear's output bit for bit."""
    kernel = CpuKernel(dnnl=False, upcast=upcast)
    assert_agree(run(kernel, counts, False, bias, dtype, nn.ReLU), run("reference", counts, False, bias, dtype,
                                                                           nn.ReLU), dtype)
    if len(counts) == 1 and dtype == torch.float32:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=g).requires_grad_() for shape in ((70, 16), (1, 8, 16), (1, 8)))
        y = grouped_linear(x, w, b if bias else None, counts, kernel)
        want = nn.functional.linear(x, w[0], b[0] if bias else None)
        assert torch.equal(y, want)
        grads = torch.autograd.grad(y.sum(), (x, w))
        assert all(torch.equal(got, need) for got, need in zip(grads, torch.autograd.grad(want.sum(), (x, w))))


@pytest.mark.parametrize("counts, hands_back", [([3, 0, 5, 0, 1, 0, 0, 7], False), ([0, 0, 0, 9, 0, 0, 0, 0], True)],
                         ids=["most experts with rows", "few"])
def test_experts_without_rows_get_zero_gradients_written_or_handed_back(monkeypatch, counts, hands_back):
    """Where few experts have rows, the weight gradient's other experts are zeroed by handing their pages back; where
    most do, by writing zeros (a page handed back is zeroed again by the kernel when next written). Either way they
    read as zero in a reused buffer that held other values."""
    monkeypatch.setattr(memory, "_MIN_BYTES", 1)  # every buffer from the recycled mappings
    memory.empty_cache()
    kernel, handed = CpuKernel(native=False, dnnl=False), []
    real = cpu.zero_pages_
    monkeypatch.setattr(cpu, "zero_pages_", lambda t: handed.append(t.shape[0]) or real(t))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(len(counts), D_FF, D_MODEL, generator=g).requires_grad_()
    x = torch.randn(sum(counts), D_MODEL, generator=g)
    grouped_linear(torch.randn(8, D_MODEL), w, None, [1] * 8, kernel).sum().backward()  # fills a buffer everywhere
    w.grad = None  # ...which goes back to the cache, and comes out again below
    grouped_linear(x, w, None, counts, kernel).sum().backward()
    want = torch.autograd.grad(grouped_linear(x, w, None, counts, "reference").sum(), w)[0]
    torch.testing.assert_close(w.grad, want)
    assert not w.grad[[c == 0 for c in counts]].any()
    assert bool(handed) == hands_back
    memory.empty_cache()


@pytest.mark.skipif(native.skinny() is None, reason="needs the native kernels (an x86 CPU and a C++ compiler)")
@pytest.mark.parametrize("counts, runs", [([0, 0, 0, 9, 0, 0, 2, 0], [3, 2, 1]), ([0, 5, 0, 3], [1, 1])])
def test_with_the_native_kernels_experts_without_rows_get_streamed_zeros(monkeypatch, counts, runs):
    """With the native loops, each run of experts outside the plan's batches is zeroed by their streamed stores, at
    any coverage (faster than both ways above), in a reused buffer that held other values; no page is handed back."""
    monkeypatch.setattr(memory, "_MIN_BYTES", 1)
    memory.empty_cache()
    skinny, zeroed = native.skinny(), []
    monkeypatch.setattr(cpu, "zero_pages_", lambda t: pytest.fail("a page handed back"))
    real = type(skinny).zero_
    monkeypatch.setattr(type(skinny), "zero_", lambda self, t: zeroed.append(t.shape[0]) or real(self, t))
    kernel = CpuKernel(dnnl=False, batching="each")  # each expert with rows alone: the others are zeroed
    g = torch.Generator().manual_seed(0)
    w = torch.randn(len(counts), D_FF, D_MODEL, generator=g).requires_grad_()
    x = torch.randn(sum(counts), D_MODEL, generator=g)
    ones = [1] * len(counts)
    # fills a buffer everywhere, which goes back to the cache, and comes out again below
    grouped_linear(torch.randn(len(counts), D_MODEL), w, None, ones, kernel).sum().backward()
    w.grad = None
    grouped_linear(x, w, None, counts, kernel).sum().backward()
    want = torch.autograd.grad(grouped_linear(x, w, None, counts, "reference").sum(), w)[0]
    torch.testing.assert_close(w.grad, want)
    assert zeroed == runs
    memory.empty_cache()


@pytest.mark.parametrize("counts", [[70], [3, 0, 5, 0, 1, 0, 0, 7]], ids=["one expert", "empty experts"])
def test_without_autograd_the_cpu_kernel_runs_no_function_node(monkeypatch, counts):
    """Under no_grad the plan's Functions are not built, and the results are the same bits."""
    g = torch.Generator().manual_seed(0)
    ex = Experts(len(counts), D_MODEL, D_FF, nn.ReLU())
    ex.reset_parameters(1.0, g)
    x = torch.randn(sum(counts), D_MODEL, generator=g)
    kernel = CpuKernel(dnnl=False)
    with_grad = ex(x, counts, kernel)
    assert with_grad.grad_fn is not None
    for function in (cpu._GroupedLinear, cpu._ReLU):
        monkeypatch.setattr(function, "apply", lambda *a: pytest.fail("an autograd Function without autograd"))
    with torch.no_grad():
        assert torch.equal(ex(x, counts, kernel), with_grad)


def test_the_cuda_kernel_runs_one_expert_as_the_dense_gemm_without_offsets(monkeypatch):
    monkeypatch.setattr(cuda.F, "grouped_mm", lambda *a, **kw: pytest.fail("grouped_mm for one expert"))
    x, w, b = torch.randn(5, 16, requires_grad=True), torch.randn(1, 8, 16, requires_grad=True), torch.randn(1, 8)
    layout = cuda.CudaKernel().layout([5], w)
    y = layout.linear(x, w, b)
    torch.testing.assert_close(y, x @ w[0].t() + b[0])
    y.sum().backward()
    torch.testing.assert_close(w.grad[0], torch.ones(5, 8).t() @ x.detach())
    assert "offsets" not in vars(layout)  # no counts went to the device (on CUDA that copy waits for the GPU)

def test_the_kernel_comes_from_the_config_and_reaches_the_experts(monkeypatch):
    seen = []
    forward = Experts.forward
    monkeypatch.setattr(Experts, "forward", lambda self, x, counts, kernel="auto", rows=None: seen.append(kernel)
                        or forward(self, x, counts, kernel, rows))
    layers = {k: SwitchFFN(D_MODEL, D_FF, RoutingConfig(num_experts=4, kernel=k), nn.ReLU()) for k in BACKENDS}
    g = torch.Generator().manual_seed(0)
    layers["reference"].router.reset_parameters(1.0, g)
    layers["reference"].experts.reset_parameters(1.0, g)
    for layer in layers.values():
        layer.load_state_dict(layers["reference"].state_dict())
    x = torch.randn(2, 5, D_MODEL)
    outputs = [layer(x) for layer in layers.values()]
    assert seen == BACKENDS
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-5)
    assert MoEConfig().kernel == "auto" and RoutingConfig.from_moe(MoEConfig(kernel="cpu")).kernel == "cpu"



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_one_expert_on_torchs_gemms_is_the_dense_linear(monkeypatch, dtype):
    monkeypatch.setattr(cpu._GroupedLinear, "apply", lambda *a: pytest.fail("the plan's Function for one expert"))
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype).requires_grad_() for shape in ((5, 16), (1, 8, 16), (1, 8)))
    y = grouped_linear(x, w, b, [5], CpuKernel(dnnl=False, upcast=False))  # torch's GEMMs: no oneDNN, no widening
    want = nn.functional.linear(x, w[0], b[0])
    assert torch.equal(y, want)  # what the dense FFN computes, bit for bit
    y.sum().backward()
    assert torch.equal(w.grad[0], torch.autograd.grad(want.sum(), w)[0][0])


@pytest.mark.parametrize("rows, grad, dnnl, dense", [(64, False, False, True), (64, True, False, True),
                                                    (512, False, False, False), (512, True, False, False),
                                                    (64, True, True, False)])
def test_one_experts_ffn_runs_as_the_dense_ffn_where_every_linear_would_take_f_linear(monkeypatch, rows, grad, dnnl,
                                                                                      dense):
    """A layout of one expert is `dense` where both of an FFN's linears would take F.linear: torch's GEMMs (not
    oneDNN's op, here from one row), and no tensor for the recycled buffers (4 MiB: the hidden (rows, 2,048) in
    float32 from 512 rows). Then Experts runs F.linear itself, past the layout's pad, linear and unpad, and computes
    the dense FFN's bits, forward and gradients; otherwise the layout's linear runs both."""
    if dnnl and cpu.dnnl_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    if rows == 512 and not memory.pools((rows, 2048), torch.float32, torch.device("cpu")):
        pytest.skip("no recycled buffers here")
    kernel = CpuKernel(dnnl_min_rows=1) if dnnl else CpuKernel(dnnl=False)
    experts = Experts(1, 512, 2048, nn.ReLU())
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(0)).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        assert kernel.layout([rows], experts.w_in).dense is dense
    linears, real = [], cpu.CpuLayout.linear
    monkeypatch.setattr(cpu.CpuLayout, "linear", lambda self, *a: linears.append(a[0].shape[0]) or real(self, *a))
    with torch.set_grad_enabled(grad):
        want = nn.functional.linear(torch.relu(nn.functional.linear(x, experts.w_in[0])), experts.w_out[0])
        y = experts(x, [rows], kernel)
    assert linears == ([] if dense else [rows, rows])
    if dense or not dnnl:  # torch's mm either way: the same bits
        assert torch.equal(y, want)
    else:  # oneDNN's own sums
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    if grad:
        gy = torch.randn(rows, 512)
        got = torch.autograd.grad(y, (x, experts.w_in, experts.w_out), gy)
        need = torch.autograd.grad(want, (x, experts.w_in, experts.w_out), gy)
        for a, b in zip(got, need):
            assert torch.equal(a, b) if dense or not dnnl else torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows, dtype, node", [(64, torch.float32, "ReluBackward0"),
                                               (1024, torch.float32, "_ReLUBackward"),
                                               (64, torch.bfloat16, "_ReLUBackward")], ids=str)
def test_the_relu_records_torchs_node_unless_the_native_loops_or_recycled_buffers_run_it(rows, dtype, node):
    """In training the layout's ReLU is torch's relu_ (its own autograd node, no Python in the step) unless the native
    loops run it (bfloat16, where they build) or its gradient goes to a recycled buffer (from 4 MiB); the same
    result and gradient either way."""
    kernel = CpuKernel()
    if dtype == torch.bfloat16 and kernel.skinny_relu(torch.zeros(1, 16, dtype=dtype)) is None:
        node = "ReluBackward0"  # no native loops on this machine
    if rows == 1024 and not memory.pools((rows, 2048), dtype, torch.device("cpu")):
        node = "ReluBackward0"  # no recycled buffers here
    g = torch.Generator().manual_seed(0)
    leaf = torch.randn(rows, 2048, generator=g).to(dtype).requires_grad_()
    h = leaf * 1  # a linear's fresh output
    layout = kernel.layout([rows // 2, rows - rows // 2], torch.zeros(2, 2048, 512, dtype=dtype))
    y = layout.relu(h)
    assert type(y.grad_fn).__name__ == node
    gy = torch.randn(rows, 2048, generator=g).to(dtype)
    assert torch.equal(y, torch.relu(leaf))
    assert torch.equal(torch.autograd.grad(y, leaf, gy)[0], torch.autograd.grad(torch.relu(leaf), leaf, gy)[0])


def test_a_dense_expert_runs_torchs_relu_in_bfloat16_too():
    """One expert on the dense path (Layout.dense) is the dense FFN's ops in every dtype: in bfloat16 torch's relu_
    and its own autograd node, not the native loops behind a Python one; the dense FFN's bits, forward and gradients."""
    g = torch.Generator().manual_seed(0)
    experts = Experts(1, 64, 256, nn.ReLU()).bfloat16()
    x = torch.randn(64, 64, generator=g).bfloat16().requires_grad_()
    kernel = CpuKernel()
    assert kernel.layout([64], experts.w_in).dense
    y = experts(x, [64], kernel)
    nodes, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        nodes.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions if n is not None]
    assert "ReluBackward0" in nodes and "_ReLUBackward" not in nodes
    want = nn.functional.linear(torch.relu(nn.functional.linear(x, experts.w_in[0])), experts.w_out[0])
    assert torch.equal(y, want)
    gy = torch.randn(64, 64, generator=g).bfloat16()
    for a, b in zip(torch.autograd.grad(y, (x, experts.w_in, experts.w_out), gy),
                    torch.autograd.grad(want, (x, experts.w_in, experts.w_out), gy)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rows, pooled", [(100, False), (4096, True)])
def test_the_layouts_gathers_write_large_results_into_recycled_buffers(rows, pooled):
    """pad's and unpad's gathers (padding, and the dispatch's rows with it) write a result of 4 MiB or more into a
    recycled buffer, and add its gradient back into one: the same values and gradient bits as index_select's."""
    if pooled and not memory.pools((rows, 1024), torch.float32, torch.device("cpu")):
        pytest.skip("no recycled buffers here")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1024, generator=g).requires_grad_()
    index = torch.randint(0, rows, (rows,), generator=g)  # repeated rows, as padding's, sum their gradients
    gy = torch.randn(rows, 1024, generator=g)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            y = cpu._gather(x, index, pool=True)
            want = x.index_select(0, index)
        assert torch.equal(y, want) and (y.data_ptr() in memory._live) is pooled
        if grad:
            got, need = torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(want, x, gy)[0]
            assert torch.equal(got, need) and (got.data_ptr() in memory._live) is pooled
    assert cpu._gather(x, index, pool=False).data_ptr() not in memory._live


@pytest.mark.parametrize("rows, plan", [(5, False), (1024, True)])
def test_one_expert_writes_into_recycled_buffers_where_its_output_is_large(monkeypatch, rows, plan):
    """One expert on torch's GEMMs takes F.linear while its output is small, and the plan's one-expert mm, written
    into a recycled buffer, from the buffers' size (4 MiB: 1,024 x 2,048 in bfloat16): F.linear's fresh output faults
    its pages in at every step. Either way the dense F.linear's output and gradients, bit for bit, where the weight
    gradient's operand is not laid out (the test below has that case)."""
    monkeypatch.setitem(cpu.MM_MIN_ROWS, cpu.instruction_set(), 64)  # torch's GEMM on the view, as F.linear's
    applied, real = [], cpu._GroupedLinear.apply
    monkeypatch.setattr(cpu._GroupedLinear, "apply", lambda *a: applied.append(a[0].shape) or real(*a))
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(*shape, generator=g).bfloat16().requires_grad_() for shape in ((rows, 64), (1, 2048, 64)))
    kernel = CpuKernel(dnnl=False, upcast=False)
    assert memory.pools((rows, 2048), torch.bfloat16, x.device) is plan
    y = grouped_linear(x, w, None, [rows], kernel)
    assert applied == ([torch.Size([rows, 64])] if plan else [])
    want = nn.functional.linear(x, w[0])
    assert torch.equal(y, want)
    gy = torch.randn(rows, 2048, generator=g).bfloat16()
    got, need = torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(want, (x, w), gy)
    assert all(torch.equal(a, b) for a, b in zip(got, need))
    applied.clear()
    assert torch.equal(grouped_linear(x, w, None, [rows], CpuKernel(dnnl=False, upcast=False, pool=False)), want)
    assert not applied  # without the recycled buffers, F.linear at any size


def test_one_expert_in_training_runs_the_plan_where_its_input_gradient_is_large(monkeypatch):
    """A down projection whose output (1,024 x 512 bfloat16, 1 MiB) is under the recycled buffers' size but whose
    input's gradient (1,024 x 2,048, 4 MiB) is not: F.linear where nothing records gradients, the plan in training.
    Either way F.linear's output and gradients, bit for bit, with the weight gradient over the view."""
    monkeypatch.setitem(cpu.MM_MIN_ROWS, cpu.instruction_set(), 64)  # torch's GEMM on the view, as F.linear's
    applied, real = [], cpu._GroupedLinear.apply
    monkeypatch.setattr(cpu._GroupedLinear, "apply", lambda *a: applied.append(a[0].shape) or real(*a))
    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(*shape, generator=g).bfloat16() for shape in ((1024, 2048), (1, 512, 2048)))
    assert not memory.pools((1024, 512), torch.bfloat16, x.device) and memory.pools(tuple(x.shape), x.dtype, x.device)
    kernel = CpuKernel(dnnl=False, upcast=False)
    want = nn.functional.linear(x, w[0])
    assert torch.equal(grouped_linear(x, w, None, [1024], kernel), want) and not applied
    x.requires_grad_(), w.requires_grad_()
    y = grouped_linear(x, w, None, [1024], kernel)
    assert applied == [x.shape] and torch.equal(y, want)
    gy = torch.randn(1024, 512, generator=g).bfloat16()
    got, need = torch.autograd.grad(y, (x, w), gy), torch.autograd.grad(nn.functional.linear(x, w[0]), (x, w), gy)
    assert all(torch.equal(a, b) for a, b in zip(got, need))


@pytest.mark.parametrize("rows, linear", [(64, True), (32, False)])
def test_one_float32_expert_takes_f_linear_where_the_plan_would_run_torchs_mm(monkeypatch, rows, linear):
    """Where oneDNN takes float32 GEMMs, one expert takes F.linear at rows where the plan would give oneDNN none of
    its GEMMs (AMX: from 64 rows), forward and training, with F.linear's bits; below, the plan (oneDNN's op)."""
    if cpu.dnnl_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(cpu, "instruction_set", lambda: "amx")
    planned, real = [], cpu._linear
    monkeypatch.setattr(cpu, "_linear", lambda *a: planned.append(a[0].shape) or real(*a))
    applied, real_apply = [], cpu._GroupedLinear.apply
    monkeypatch.setattr(cpu._GroupedLinear, "apply", lambda *a: applied.append(a[0].shape) or real_apply(*a))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 512, generator=g), torch.randn(1, 2048, 512, generator=g)
    gy = torch.randn(rows, 2048, generator=g)
    kernel = CpuKernel()
    assert not memory.pools((rows, 2048), torch.float32, x.device)
    want = nn.functional.linear(x, w[0])
    y = grouped_linear(x, w, None, [rows], kernel)
    assert (planned == []) == linear and not applied
    x.requires_grad_(), w.requires_grad_()
    y_grad = grouped_linear(x, w, None, [rows], kernel)
    assert (applied == []) == linear
    got = [y, y_grad.detach(), *torch.autograd.grad(y_grad, (x, w), gy)]
    need = [want, want, *torch.autograd.grad(nn.functional.linear(x, w[0]), (x, w), gy)]
    for a, b in zip(got, need):
        if linear:
            assert torch.equal(a, b)
        else:  # oneDNN's own sums
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_auto_and_unknown_kernels():
    assert get_kernel("auto", torch.device("cpu")).name == "cpu"
    assert get_kernel("auto", torch.device("cuda")).name == "cuda"
    assert get_kernel("auto", torch.device("cpu")) is get_kernel("cpu", torch.device("cpu"))  # made once
    tuned = CpuKernel(batching="pairs")
    assert get_kernel(tuned, torch.device("cpu")) is tuned
    with pytest.raises(MoeifyError, match="kernel 'tpu' is not one of auto, reference, cpu, cuda"):
        get_kernel("tpu", torch.device("cpu"))
    with pytest.raises(MoeifyError, match="kernel must be one of auto, reference, cpu, cuda, got 'tpu'"):
        MoEConfig(kernel="tpu")


class _NoLinear:
    def __getattr__(self, name):
        raise AttributeError(name)


@pytest.mark.parametrize("op", ["missing", "wrong", "raises"])
def test_the_onednn_probe_falls_back_silently(monkeypatch, op):
    """A torch without the private op, or with one that computes something else or fails: no oneDNN, same
    results from bmm alone."""
    if op == "missing":
        monkeypatch.setattr(torch.ops, "mkldnn", _NoLinear())
    else:
        def fake(x, w, b, *args):
            if op == "raises":
                raise RuntimeError("not built with oneDNN")
            return torch.zeros(x.shape[0], w.shape[0])
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", fake)
    assert cpu.probe_dnnl() is None
    monkeypatch.setattr(cpu, "_DNNL", [])  # probed again on next use, under the patch
    x, w, b = torch.randn(70, 16), torch.randn(2, 8, 16), torch.randn(2, 8)
    y = grouped_linear(x, w, b, [64, 6], CpuKernel(dnnl_min_rows=1))
    assert cpu._DNNL == [None]
    torch.testing.assert_close(y, grouped_linear(x, w, b, [64, 6], "reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_onednn_forward_agrees_with_the_reference(dtype):
    """Every group through oneDNN's linear (from one row), fp32 and bf16, against the loop."""
    if cpu.dnnl_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    a, b = run(CpuKernel(dnnl_min_rows=1), CASES["empty experts"], True, True, dtype), \
        run("reference", CASES["empty experts"], True, True, dtype)
    for got, want in zip(a, b):
        error = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert error <= TOLERANCE[dtype], float(error)


def test_the_onednn_probe_finds_the_op_where_torch_has_it(monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    assert cpu.probe_dnnl() is torch.ops.mkldnn._linear_pointwise
    used = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(cpu, "_DNNL", [lambda *a: used.append(a[0].shape[0]) or real(*a)])
    x, w, b = torch.randn(46, 16), torch.randn(2, 8, 16), torch.randn(2, 8)
    y = grouped_linear(x, w, b, [40, 6], CpuKernel(batching="pairs"))  # 40 rows: oneDNN's on every machine class
    assert used == [40, 40]  # both experts of the pair: the pair is padded to 40 rows each
    torch.testing.assert_close(y, grouped_linear(x, w, b, [40, 6], "reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("machine", ["avx2", "avx512", "amx"])
# One expert (its own branch), several, and experts of 512 rows or more.
@pytest.mark.parametrize("counts", [[40], [40, 0, 33, 5], [600, 0, 530]])
def test_onednn_takes_the_gemms_only_where_it_pays(monkeypatch, machine, counts):
    """DNNL_ROWS per machine class: AVX-512 runs every GEMM of 3 rows or more with oneDNN's linear; AVX2 never the
    weight gradient (MKL's mm, as oneDNN's ran 1.1-2.1x slower there), and nothing from 512 rows; AMX nothing from 64
    rows. Every result equals the reference loop's either way."""
    if cpu.dnnl_op() is None:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(cpu, "instruction_set", lambda: machine)
    calls, real = [], cpu.dnnl_op()
    # Only the weight gradient hands oneDNN a transposed view first (g.T); the forward's x and the input gradient's
    # g are rows.
    monkeypatch.setattr(cpu, "_DNNL", [lambda *a: calls.append("weight" if a[0].stride(0) == 1 else "other")
                                       or real(*a)])
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(len(counts), 32, 16, generator=g), torch.randn(len(counts), 32, generator=g)
    x, gy = torch.randn(sum(counts), 16, generator=g), torch.randn(sum(counts), 32, generator=g)

    def step(kernel):
        leaves = [t.detach().requires_grad_() for t in (x, w, b)]
        y = grouped_linear(*leaves, counts, kernel)
        y.backward(gy)
        return [y, *(t.grad for t in leaves)]

    for got, want in zip(step(CpuKernel(native=False)), step("reference")):  # sums of up to 600 products
        got, want = got.detach(), want.detach()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if machine == "avx512":
        assert "other" in calls and "weight" in calls
    elif machine == "amx":
        small = [c for c in counts if 3 <= c < 64]  # the weight gradient's oneDNN rows
        assert ("weight" in calls) == bool(small) and ("other" in calls) == any(0 < c < 64 for c in counts)
    else:
        assert "weight" not in calls and ("other" in calls) == (min(c for c in counts if c) < 512)


def _moved(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of t starting `offset` elements past an allocation's start (4-byte steps for float32)."""
    buffer = torch.empty(t.numel() + 16, dtype=t.dtype)
    return buffer[offset:offset + t.numel()].view_as(t).copy_(t)


@pytest.mark.parametrize("counts", [[1, 3, 0, 2], [9, 12, 0, 16], [70, 1, 0, 64], [4, 4, 1, 2], [600, 0, 520, 3]])
@pytest.mark.parametrize("out, inp", [(64, 32), (32, 64), (30, 13)])  # out >= in, out < in, sizes off every boundary
@pytest.mark.parametrize("batching", ["auto", "pairs"])  # pairs: experts with a gap between them in one bmm
def test_the_cpu_kernel_gives_the_same_bits_wherever_the_tensors_lie(monkeypatch, counts, out, inp, batching):
    """A loaded checkpoint's tensors sit at the file's offsets, not at an allocator's 64-byte boundary: results must
    not depend on that, or a model saved and loaded again computes different bits (MKL's (w @ x.T).T did). This
    checks the output and every gradient, with the native kernels where the sizes allow them."""
    ops = []
    real = native.Skinny.run
    monkeypatch.setattr(native.Skinny, "run", lambda self, op, *a: ops.append(op) or real(self, op, *a))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(len(counts), out, inp, generator=g)
    b = torch.randn(len(counts), out, generator=g)
    x = torch.randn(sum(counts), inp, generator=g)
    gy = torch.randn(sum(counts), out, generator=g)

    def step(*tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        y = grouped_linear(*leaves[:2], leaves[2], counts, CpuKernel(batching=batching))
        y.backward(gy)
        return [y, *(t.grad for t in leaves)]

    want = step(x, w, b)
    limit = max(cpu.native_max_rows(native.skinny(), torch.float32, torch.float32, out, inp))  # some op runs natively
    few = min(b.slots for b in CpuKernel(batching=batching).layout(counts, w).batches) <= limit
    assert bool(ops) == (few and out % 16 == 0 and inp % 16 == 0 and native.skinny() is not None)
    for offset in range(1, 16):  # 4-byte steps through every 64-byte alignment
        got = step(_moved(x, offset), _moved(w, offset), _moved(b, offset))
        for name, a, e in zip(("output", "x grad", "weight grad", "bias grad"), got, want):
            assert torch.equal(a, e), (offset, name)


@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gated, bias", [(False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reduced_precision_agrees_with_the_reference_with_and_without_float32_compute(upcast, case, gated, bias, dtype):
    """Both ways of running bfloat16 and float16 on every machine, whichever one the probe picks here."""
    a, b = run(CpuKernel(upcast=upcast), CASES[case], gated, bias, dtype, nn.ReLU), \
        run("reference", CASES[case], gated, bias, dtype, nn.ReLU)
    for i, (got, want) in enumerate(zip(a, b)):
        if want is None or not want.numel():
            assert got is None or not got.any(), i
            continue
        assert got.dtype == want.dtype == dtype and got.shape == want.shape, i
        error = (got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)
        assert error <= TOLERANCE[dtype], (i, float(error))


# oneDNN's rows (and a 2-row expert), and experts of one row: forwards on the native loops where they build, else
# unwidened under UPCAST_MIN_ROWS (native=False), bmm backward
@pytest.mark.parametrize("counts", [[70, 0, 2, 5], [1, 1, 1]])
@pytest.mark.parametrize("loops", [True, False])
def test_float32_compute_of_bfloat16_is_the_widened_product_rounded_once(counts, loops):
    """Each expert's output and every gradient equal float32 arithmetic on the widened bfloat16 tensors, rounded
    to bfloat16 once: at most half a unit in the last place (order of the float32 sums aside)."""
    g = torch.Generator().manual_seed(0)
    w, b, x, gy = (torch.randn(*shape, generator=g).bfloat16()
                   for shape in ((len(counts), 32, 48), (len(counts), 32), (sum(counts), 48), (sum(counts), 32)))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = grouped_linear(leaves[0], leaves[1], leaves[2], counts, CpuKernel(upcast=True, native=loops))
    y.backward(gy)
    rows = torch.arange(sum(counts)).split(counts)
    want_y = torch.cat([x[r].float() @ w[e].float().T + b[e].float() for e, r in enumerate(rows)])
    want_gx = torch.cat([gy[r].float() @ w[e].float() for e, r in enumerate(rows)])
    want_gw = torch.stack([gy[r].float().T @ x[r].float() for r in rows])
    want_gb = torch.stack([gy[r].float().sum(0) for r in rows])
    for got, want in zip((y, *(t.grad for t in leaves)), (want_y, want_gx, want_gw, want_gb)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-6)


def test_float32_compute_follows_the_probe(monkeypatch):
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    for native_here in (True, False):
        monkeypatch.setattr(cpu, "reduced_is_native", lambda dtype: native_here)
        assert CpuKernel().upcasts(x) is not native_here
        assert CpuKernel(upcast=True).upcasts(x) and not CpuKernel(upcast=False).upcasts(x)
        assert not CpuKernel(upcast=True).upcasts(x.float())  # float32 is float32's own compute
    monkeypatch.undo()
    cpu.reduced_is_native.cache_clear()
    monkeypatch.setitem(cpu._NATIVE_REDUCED, torch.bfloat16, "_no_such_probe")  # a torch without oneDNN's check
    assert cpu.reduced_is_native(torch.bfloat16)  # keeps torch's own path
    cpu.reduced_is_native.cache_clear()
    monkeypatch.undo()
    assert cpu.reduced_is_native(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_float32_compute_keeps_what_autograd_saves_in_bfloat16():
    """The widened copies live only inside the kernel: training memory stays bfloat16's."""
    x = torch.randn(12, 16).bfloat16().requires_grad_()
    ex = Experts(3, 16, 32, nn.ReLU())
    ex.reset_parameters(1.0, torch.Generator().manual_seed(0))
    ex.bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        y = ex(x, [5, 0, 7], CpuKernel(upcast=True))
    assert y.dtype == torch.bfloat16 and {d for d in saved if d.is_floating_point} == {torch.bfloat16}  # (and indices)
    y.sum().backward()
    assert x.grad.dtype == ex.w_in.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_experts_paired_with_a_gap_get_their_input_gradient_without_a_weight_copy(monkeypatch, dtype):
    """A pair of experts with others between them is one strided view of the stacked weight: torch's reduced-precision
    bmm copies it into a temporary first, so there the input gradient takes one mm per expert (as the forward does).
    Either way the gradients equal the reference's."""
    counts = [20, 3, 18, 5]  # pairs by count: experts (0, 2) and (3, 1), each pair strided
    kernel = CpuKernel(batching="pairs", native=False, dnnl=False, mkl_batch=False)  # torch's bmm / mm paths only
    w = torch.randn(4, 64, 32).to(dtype)
    assert all(b.step > 1 for b in kernel.layout(counts, w).batches)
    strided = []
    real = torch.bmm
    monkeypatch.setattr(cpu.torch, "bmm", lambda a, b, **kw: strided.append(not b.is_contiguous()) or real(a, b, **kw))
    x, gy = torch.randn(sum(counts), 32).to(dtype), torch.randn(sum(counts), 64).to(dtype)
    got = []
    for k in (kernel, "reference"):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        grouped_linear(*leaves, None, counts, k).backward(gy)
        got.append([t.grad for t in leaves])
    # bmm ran (the weight gradient's reads g transposed and x's rows); a strided weight view reaches it in float32
    # only, where one bmm over the pair is faster than an mm per expert and copies nothing
    assert strided and any(strided) == (dtype == torch.float32)
    for a, e in zip(*got):
        torch.testing.assert_close(a, e, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)


@pytest.mark.parametrize("counts, spans", [
    ([90, 70, 80, 75], True),  # busiest 90 rows, the span 4 x 90 = 1.14x the rows
    ([90, 0, 80, 75], False),  # an empty expert inside the span: 4 x 90 = 1.47x the rows
    ([0, 90, 60, 70], True),  # the span covers the used experts only: 3 x 90 = 1.23x
])
def test_reduced_precision_spans_its_experts_where_bmm_takes_every_gemm(monkeypatch, counts, spans):
    """Where reduced-precision bmm beats one mm per expert at any rows (MM_MIN_ROWS None, the AMX machine), experts
    above the native forward's rows run as one bmm over their span, padded to the busiest, unless that pads more than
    SPAN_MAX_PADDING; below those rows, in float32, or where bmm stops (MM_MIN_ROWS 64), the cost model's plan (pairs
    here: with a 1024 x 1024 weight it counts a span's padding dearer than a second call)."""
    kernel = CpuKernel(upcast=False, native=False, mkl_batch=False)
    big = torch.empty(len(counts), 1024, 1024, dtype=torch.bfloat16)
    monkeypatch.setitem(cpu.MM_MIN_ROWS, cpu.instruction_set(), None)
    first = next(e for e, c in enumerate(counts) if c)
    span = [cpu._Batch(first, 1, len(counts) - first, max(counts), 0)]
    assert (kernel.layout(counts, big).batches == span) is spans
    assert kernel.layout(counts, big.float()).batches != span  # float32: oneDNN's or the cost model's plan
    monkeypatch.setattr(cpu, "native_max_rows", lambda *a: (90, 90, 90))  # the native loops take the busiest
    assert kernel.layout(counts, big).batches != span
    monkeypatch.undo()
    monkeypatch.setitem(cpu.MM_MIN_ROWS, cpu.instruction_set(), 64)
    assert kernel.layout(counts, big).batches != span
    # and the span's bmm computes what the reference does
    monkeypatch.setitem(cpu.MM_MIN_ROWS, cpu.instruction_set(), None)
    bmm, real = [], torch.bmm
    monkeypatch.setattr(cpu.torch, "bmm", lambda a, b, **kw: bmm.append(a.shape) or real(a, b, **kw))
    w = torch.randn(len(counts), 32, 16).bfloat16()
    x, gy = torch.randn(sum(counts), 16).bfloat16(), torch.randn(sum(counts), 32).bfloat16()
    got = []
    for k in (kernel, "reference"):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        y = grouped_linear(*leaves, None, counts, k)
        y.backward(gy)
        got.append([y, *(t.grad for t in leaves)])
    assert torch.Size([span[0].k, max(counts), 16]) in bmm  # the forward's bmm over the span (any plan, small weights)
    for a, e in zip(*got):
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_a_span_of_many_reduced_precision_experts_runs_its_up_projection_natively_to_more_rows():
    """SPAN_FORWARD_ROWS: on AMX one batch of at least 32 bfloat16 experts runs the forward where out > in natively to
    352 rows per expert; fewer experts, several batches, out <= in, float32 and machines without the rule keep
    NATIVE_MAX_ROWS' limit."""
    amx, avx512 = (type("Skinny", (), {"variant": v})() for v in ("amx", "avx512"))
    up, down = torch.empty(1, 64, 32, dtype=torch.bfloat16), torch.empty(1, 32, 64, dtype=torch.bfloat16)
    span, pairs = [cpu._Batch(0, 1, 32, 300, 0)], [cpu._Batch(0, 1, 16, 300, 0), cpu._Batch(16, 1, 16, 300, 4800)]
    bf16_up, bf16_down = (cpu.NATIVE_MAX_ROWS["amx"][cpu.BF16, cpu.BF16][0][i] for i in (0, 1))
    assert (bf16_up, bf16_down) == (256, 192)
    assert cpu._forward_rows(amx, torch.bfloat16, up, span) == 352
    assert cpu._forward_rows(amx, torch.bfloat16, up, [cpu._Batch(0, 1, 31, 300, 0)]) == bf16_up
    assert cpu._forward_rows(amx, torch.bfloat16, up, pairs) == bf16_up
    assert cpu._forward_rows(amx, torch.bfloat16, down, span) == bf16_down
    assert cpu._forward_rows(amx, torch.float32, up.float(), span) == cpu.NATIVE_MAX_ROWS["amx"][cpu.F32, cpu.F32][0][0]
    # NATIVE_MAX_ROWS' for the AVX-512 build, which has no span rule
    avx512_up = cpu.NATIVE_MAX_ROWS["avx512"][cpu.BF16, cpu.BF16][0][0]
    assert cpu._forward_rows(avx512, torch.bfloat16, up, span) == avx512_up
    assert cpu._forward_rows(None, torch.bfloat16, up, span) == 0


def test_a_span_of_many_bfloat16_experts_on_the_tiles_computes_the_references_output(monkeypatch):
    """That forward on the AMX tiles, 32 experts padded to 300 rows: the reference's output within bfloat16 rounding,
    with the native loops taking every expert."""
    skinny = native.skinny()
    if skinny is None or skinny.variant != "amx":
        pytest.skip("the native kernels' AMX build does not run here")
    ops, real = [], cpu._native
    monkeypatch.setattr(cpu, "_native", lambda kernel, op, picked, *a: ops.append((op, len(picked[0])))
                        or real(kernel, op, picked, *a))
    counts = [300 - 2 * e for e in range(32)]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, 32, generator=g).bfloat16()
    x = torch.randn(sum(counts), 32, generator=g).bfloat16()
    kernel = CpuKernel(upcast=False, batching="span", mkl_batch=False)
    got = grouped_linear(x, w, None, counts, kernel)
    assert ops == [(cpu.native.FORWARD, 32)]
    want = grouped_linear(x, w, None, counts, "reference")
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("counts, out, inp, laid_out", [
    ([20, 0, 9, 14], 32, 16, [(4, 20, 32)]),  # the span's g, (experts, slots, out)
    ([20, 0, 9, 14], 16, 32, [(4, 20, 16)]),
    ([256, 250], 64, 16, [(2, 256, 16), (2, 16, 64)]),  # x (experts, slots, in), then the (experts, in, out) result
    ([1024], 2048, 64, [(1024, 64), (64, 2048)]),  # one expert, through the plan (its output 4 MiB)
])
def test_the_weight_gradient_takes_its_narrower_operand_laid_out_transposed(monkeypatch, counts, out, inp, laid_out):
    """Where reduced-precision bmm runs at any rows (MM_MIN_ROWS None), the weight gradient's GEMM reads g.T as laid
    out by the native loops' transposing copy, one copy per batch of experts; or, where copying x and the (in, out)
    result moves at most half of g's elements, x.T @ g with both laid out. Either way the reference's gradients."""
    skinny = native.skinny()
    if skinny is None:
        pytest.skip("the native kernels do not build here")
    monkeypatch.setitem(cpu.MM_MIN_ROWS, cpu.instruction_set(), None)
    monkeypatch.setattr(cpu, "native_max_rows", lambda *a: (0, 0, 0))  # every GEMM on torch's bmm
    copies, real = [], native.Skinny.transpose
    monkeypatch.setattr(native.Skinny, "transpose",
                        lambda self, s, d: copies.append(tuple(s.shape)) or real(self, s, d))
    kernel = CpuKernel(upcast=False, batching="span", mkl_batch=False)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(len(counts), out, inp, generator=g).bfloat16()
    x, gy = torch.randn(sum(counts), inp, generator=g).bfloat16(), torch.randn(sum(counts), out, generator=g).bfloat16()
    got = []
    for k in (kernel, "reference"):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        grouped_linear(*leaves, None, counts, k).backward(gy)
        got.append([t.grad for t in leaves])
    assert copies == laid_out
    for a, e in zip(*got):
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=2e-2)
    copies.clear()
    monkeypatch.setitem(cpu.MM_MIN_ROWS, cpu.instruction_set(), 64)  # where bmm is not the rule: the view, no copy
    grouped_linear(x.clone().requires_grad_(), w.clone().requires_grad_(), None, counts, kernel).backward(gy)
    assert not copies


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_the_cpu_kernels_router_reads_bfloat16_natively_from_enough_tokens(monkeypatch):
    """bfloat16 activations and a float32 weight of up to ROUTER_MAX_EXPERTS experts: the native loops' logits and
    gradients, within float32's rounding of the reference's F.linear on x widened; otherwise (float32 x, more experts,
    a width off 32, native=False, tracing) F.linear itself, bit for bit."""
    skinny = native.skinny()
    if skinny is None:
        pytest.skip("the native kernels do not build here")
    calls, real = [], native.Skinny.router_logits
    monkeypatch.setattr(native.Skinny, "router_logits", lambda self, x, w: calls.append(x.shape[0]) or real(self, x, w))
    g = torch.Generator().manual_seed(0)
    tokens = 300
    x = torch.randn(tokens, 64, generator=g).bfloat16()
    w = torch.randn(8, 64, generator=g) * 0.1
    gy = torch.randn(tokens, 8, generator=g)
    got = []
    for kernel in (CpuKernel(), get_kernel("reference", x.device)):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        logits = kernel.router_logits(*leaves)
        logits.backward(gy)
        got.append([logits, *(t.grad for t in leaves)])
    assert calls == [tokens] and got[1][0].dtype == got[0][0].dtype == torch.float32
    for a, e in zip(*got):
        torch.testing.assert_close(a.float(), e.float(), rtol=1e-2, atol=1e-4)  # x's gradient: bfloat16's rounding
    with torch.no_grad():  # no autograd node: the same bits
        assert torch.equal(CpuKernel().router_logits(x, w), got[0][0].detach())
    calls.clear()
    cases = [(x[:, :48], w[:, :48], CpuKernel()), (x.float(), w, CpuKernel()), (x, w, CpuKernel(native=False)),
             (x, torch.randn(native.ROUTER_MAX_EXPERTS + 1, 64, generator=g), CpuKernel())]
    for xs, ws, kernel in cases:
        assert torch.equal(kernel.router_logits(xs, ws), nn.functional.linear(xs.float(), ws))
    with warnings.catch_warnings():  # no shape is compared in Python while tracing: the trace holds no choice
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(lambda a, b: CpuKernel().router_logits(a, b), (x, w), check_trace=False)
    assert torch.equal(traced(x, w), nn.functional.linear(x.float(), w))
    assert calls == []


def test_one_experts_router_takes_torchs_logits_below_its_machines_rows(monkeypatch):
    """One expert's logits: torch's F.linear on x widened (bit for bit) below ROUTER_ONE_MIN_ROWS for this machine
    class, the native loops from there; a machine class without an entry, and several experts, from any row."""
    if native.skinny() is None:
        pytest.skip("the native kernels do not build here")
    calls, real = [], native.Skinny.router_logits
    monkeypatch.setattr(native.Skinny, "router_logits", lambda self, x, w: calls.append(x.shape[0]) or real(self, x, w))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 64, generator=g).bfloat16(), torch.randn(2, 64, generator=g)
    monkeypatch.setattr(cpu, "ROUTER_ONE_MIN_ROWS", {cpu.instruction_set(): 32})
    for rows, experts in ((31, 1), (32, 1), (8, 2)):
        got = CpuKernel().router_logits(x[:rows], w[:experts])
        if rows < 32 and experts == 1:
            assert torch.equal(got, nn.functional.linear(x[:rows].float(), w[:experts]))
    assert calls == [32, 8]
    calls.clear()
    monkeypatch.setattr(cpu, "ROUTER_ONE_MIN_ROWS", {})
    CpuKernel().router_logits(x[:1], w[:1])
    assert calls == [1]


def test_the_switch_layer_routes_with_its_kernels_logits(monkeypatch):
    """SwitchFFN hands its routing kernel to the router: the reference kernel's logits are F.linear's own."""
    seen = []
    real = cpu.CpuKernel.router_logits
    monkeypatch.setattr(cpu.CpuKernel, "router_logits", lambda self, x, w: seen.append("cpu") or real(self, x, w))
    for kernel in ("reference", "cpu"):
        layer = SwitchFFN(16, 32, RoutingConfig(num_experts=4, kernel=kernel), nn.ReLU())
        layer(torch.randn(2, 5, 16))
    assert seen == ["cpu"]
