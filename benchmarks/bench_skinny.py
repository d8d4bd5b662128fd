"""Where the native kernels pay: each of their ops against torch's path for the same op, by rows per expert.

64 experts of t5-small's two FFN shapes (out x in: 2048 x 512, 512 x 2048), float32 and bfloat16, 2 threads, one
process, the two implementations interleaved, medians of --reps. torch's paths are those the cpu kernel takes
without the native kernels: float32 oneDNN's linear per expert, copied into place, for all three ops (bmm below 3
rows); bfloat16 bmm (the weight gradient into a pooled buffer). The row limits in moeify/layers/kernels/cpu.py
(NATIVE_MAX_ROWS) come from this table.
Usage: python benchmarks/bench_skinny.py [--rows 1 2 4 ...] [--dtypes fp32 bf16] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _report import report

from moeify.layers import memory
from moeify.layers.kernels import cpu, native

EXPERTS = 64
SHAPES = [(2048, 512), (512, 2048)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ["forward", "input grad", "weight grad"]


def cases(kernel: native.Skinny, dtype: torch.dtype, out: int, in_: int, k: int):
    """{op: (native, torch)} callables on the same operands."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(EXPERTS, out, in_, generator=g).to(dtype)
    x, gy = torch.randn(EXPERTS, k, in_, generator=g).to(dtype), torch.randn(EXPERTS, k, out, generator=g).to(dtype)
    y, gx = torch.empty(EXPERTS, k, out, dtype=dtype), torch.empty(EXPERTS, k, in_, dtype=dtype)
    gw = memory.empty((EXPERTS, out, in_), dtype, torch.device("cpu"), True)[0]
    rows = np.full(EXPERTS, k, dtype=np.int64)

    def ptrs(t):
        return t.data_ptr() + np.arange(EXPERTS, dtype=np.int64) * t[0].numel() * t.element_size()

    dnnl = cpu.dnnl_op()
    # What the cpu kernel does without the native kernels: float32 takes oneDNN's linear per expert from its minimum
    # rows (forward, backward), each result copied into place (the backward's GEMMs as transposed views); bmm else.
    takes_dnnl = dtype == torch.float32 and dnnl is not None
    forward_dnnl, backward_dnnl = (takes_dnnl and k >= rows for rows in cpu.DNNL_MIN_ROWS.get(dtype, (0, 0)))

    def torch_forward():
        if forward_dnnl:
            for e in range(EXPERTS):
                y[e].copy_(dnnl(x[e], w[e], None, "none", [], ""))
        else:
            torch.bmm(x, w.transpose(1, 2), out=y)

    def torch_input_grad():
        if backward_dnnl:
            for e in range(EXPERTS):
                gx[e].copy_(dnnl(gy[e], w[e].t(), None, "none", [], ""))
        else:
            torch.bmm(gy, w, out=gx)

    def torch_weight_grad():
        if backward_dnnl:
            for e in range(EXPERTS):
                gw[e].copy_(dnnl(gy[e].t(), x[e].t(), None, "none", [], ""))
        else:
            torch.bmm(gy.transpose(1, 2), x, out=gw)
    return {
        "forward": (lambda: kernel.run(native.FORWARD, dtype, rows, ptrs(x), ptrs(w), ptrs(y), out, in_),
                    torch_forward),
        "input grad": (lambda: kernel.run(native.INPUT_GRAD, dtype, rows, ptrs(gy), ptrs(w), ptrs(gx), out, in_),
                       torch_input_grad),
        "weight grad": (lambda: kernel.run(native.WEIGHT_GRAD, dtype, rows, ptrs(gy), ptrs(x), ptrs(gw), out, in_),
                        torch_weight_grad),
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
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_skinny.md")
    args = parser.parse_args()
    kernel = native.skinny()
    if kernel is None:
        raise SystemExit("the native kernels are not available here (no C++ compiler or no AVX-512)")
    rows = []
    for name in args.dtypes:
        dtype = DTYPES[name]
        for out, in_ in SHAPES:
            limits = cpu.native_max_rows(dtype, out, in_)
            for k in args.rows:
                fns = cases(kernel, dtype, out, in_, k)
                for f in (f for pair in fns.values() for f in pair):  # warm-up: first touches, the pool's mappings
                    f()
                cells = []
                for i, op in enumerate(OPS):
                    mine, theirs = median_ms(fns[op], args.reps)
                    cells.append(f"{mine:.1f} / {theirs:.1f} = {mine / theirs:.2f}x{' *' if k <= limits[i] else ''}")
                rows.append((name, f"{out} x {in_}", str(k), *cells))
    report(f"Native kernel / torch's path, ms for {EXPERTS} experts, {torch.get_num_threads()} threads, median of "
           f"{args.reps}; * where the cpu kernel takes the native kernel (cpu.NATIVE_MAX_ROWS)",
           ["dtype", "out x in", "rows per expert", *OPS], rows, args.out,
           ["Below 1.00x the native kernel is faster."])


if __name__ == "__main__":
    main()
