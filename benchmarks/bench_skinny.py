"""Where the native kernels pay: each of their ops against torch's path for the same op, by rows per expert.

64 experts of t5-small's two FFN shapes (out x in: 2048 x 512, 512 x 2048), 2 threads, one process, the two
implementations interleaved, medians of --reps; modes float32, bfloat16, and float32 compute on bfloat16 weights (the
cpu kernel's upcast, where torch has no fast bfloat16 GEMM). torch's path is the cpu kernel's own code without the
native GEMMs (cpu._forward, cpu._backward over one batch of the 64 experts; the backward with the library's transposing
copy where the kernel uses it); for the ReLU on the (rows, out) output
and its gradient (without dropout), torch's relu_ and threshold_backward. The row limits in
moeify/layers/kernels/cpu.py (NATIVE_MAX_ROWS, per build of the kernels) and the dtypes of CpuKernel.skinny_relu come
from this table.
Usage: python benchmarks/bench_skinny.py [--rows 1 2 4 ...] [--modes fp32 bf16 "fp32 on bf16"] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch
from _report import positive_int, report

from moeify.layers import memory
from moeify.layers.kernels import cpu, native

EXPERTS = 64
SHAPES = [(2048, 512), (512, 2048)]
MODES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
         "fp32 on bf16": (torch.float32, torch.bfloat16)}  # (activations, weights)
OPS = ["forward", "input grad", "weight grad", "relu", "relu grad"]


def native_gemms_off():
    """The cpu kernel's backward with none of its GEMMs on the native loops, but the library's other help on (the
    transposing copy of the weight gradient's operand, where the kernel lays it out): its path above the native rows."""
    return mock.patch.object(cpu, "native_max_rows", lambda *args: (0, 0, 0))


def cases(kernel: native.Skinny, compute: torch.dtype, dtype: torch.dtype, out: int, in_: int, k: int):
    """{op: (native, torch)} callables on the same operands."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(EXPERTS, out, in_, generator=g).to(dtype)
    x, gy = (torch.randn(EXPERTS * k, d, generator=g).to(compute) for d in (in_, out))
    y, gx = torch.empty(EXPERTS * k, out, dtype=compute), torch.empty(EXPERTS * k, in_, dtype=compute)
    gw = memory.empty((EXPERTS, out, in_), dtype, torch.device("cpu"), True)[0]
    rows = np.full(EXPERTS, k, dtype=np.int64)

    def ptrs(t):
        return t.data_ptr() + np.arange(EXPERTS, dtype=np.int64) * (t.numel() // EXPERTS) * t.element_size()

    def native_op(op, a, b, c):
        return lambda: kernel.run(op, dtype, rows, ptrs(a), ptrs(b), ptrs(c), out, in_, compute)

    batches = [cpu._Batch(0, 1, EXPERTS, k, 0)]
    dnnl = cpu.CpuKernel().dnnl_for(compute, x.device)
    batched = cpu.CpuKernel().mkl_batch_for(compute, dtype, x.device)
    narrow = None if compute == dtype else x.to(dtype)  # the upcast forward's unwidened rows

    def backward(need_x):
        ctx = SimpleNamespace(batches=batches, skinny=kernel, needs_input_grad=(need_x, not need_x, False), pool=True,
                              dnnl=dnnl, has_bias=False, batched=batched)

        def run():
            with native_gemms_off():
                cpu._backward(ctx, x, w, gy)
        return run
    # ReLU in place on a (rows, out) output and its gradient: the native loops' bits against torch's relu_ and
    # threshold_backward, what cpu._ReLU runs without them (in place: after the first call both run on its output)
    h, hg = torch.randn(EXPERTS * k, out, generator=g).to(compute), torch.empty(EXPERTS * k, out, dtype=compute)
    return {
        "relu": (lambda: kernel.relu_dropout(native.RELU, h, None, h, 0.0), lambda: torch.relu_(h)),
        "relu grad": (lambda: kernel.relu_dropout(native.RELU_GRAD, gy, h, hg, 0.0),
                      lambda: torch.ops.aten.threshold_backward.grad_input(gy, h, 0, grad_input=hg)),
        "forward": (native_op(native.FORWARD, x, w, y),
                    lambda: cpu._forward(x, w, None, batches, dnnl, None, True, narrow, batched)),
        "input grad": (native_op(native.INPUT_GRAD, gy, w, gx), backward(True)),
        "weight grad": (native_op(native.WEIGHT_GRAD, gy, x, gw), backward(False)),
    }


def median_ms(fns, reps: int) -> list[float]:
    times = [[] for _ in fns]
    for r in range(reps):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=positive_int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--reps", type=positive_int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_skinny.md")
    args = parser.parse_args()
    kernel = native.skinny()
    if kernel is None:
        raise SystemExit("the native kernels are not available here (no C++ compiler, or neither AVX-512 nor AVX2)")
    rows = []
    for name in args.modes:
        compute, dtype = MODES[name]
        for out, in_ in SHAPES:
            limits = cpu.native_max_rows(kernel, compute, dtype, out, in_)
            relu_taken = cpu.CpuKernel().skinny_relu(torch.empty(1, out, dtype=compute)) is not None
            for k in args.rows:
                fns = cases(kernel, compute, dtype, out, in_, k)
                for f in (f for pair in fns.values() for f in pair):  # warm-up: first touches, the pool's mappings
                    f()
                cells = []
                for i, op in enumerate(OPS):
                    mine, theirs = median_ms(fns[op], args.reps)
                    taken = k <= limits[i] if i < len(limits) else relu_taken
                    cells.append(f"{mine:.1f} / {theirs:.1f} = {mine / theirs:.2f}x{' *' if taken else ''}")
                rows.append((name, f"{out} x {in_}", str(k), *cells))
    report(f"Native kernel ({kernel.variant}) / torch's path, ms for {EXPERTS} experts, {torch.get_num_threads()} "
           f"threads, median of {args.reps}; * where the cpu kernel takes the native kernel (cpu.NATIVE_MAX_ROWS; "
           "ReLU: CpuKernel.skinny_relu)",
           ["mode", "out x in", "rows per expert", *OPS], rows, args.out,
           ["Below 1.00x the native kernel is faster."])


if __name__ == "__main__":
    main()
