"""What each trick of the cpu kernel buys: the Switch layer's training step with each one switched off.

One process, every variant interleaved on identical weights and inputs, medians of --reps. Variants: the
cpu kernel as shipped; without oneDNN's linear; without MKL's batched GEMM; without the huge-page buffer pool;
without the native kernels for few rows per expert (skinny.cpp); without float32 compute for bfloat16 (which runs
only where torch has no fast bfloat16 GEMM); with the cost model replaced by one bmm over all experts (span) or by
pairs; the reference loop; the cuda kernel's grouped_mm (which runs on CPU too).
Usage: python benchmarks/bench_kernels.py [--dtype fp32|bf16] [--reps 7] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import positive_int, report, round_orders
from torch import nn

from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.layers.dispatch import dispatch
from moeify.layers.kernels.cpu import CpuKernel

D_MODEL, D_FF = 512, 2048  # t5-small's FFN
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = {
    "cpu": CpuKernel(),
    "no oneDNN": CpuKernel(dnnl=False),
    "no MKL batch": CpuKernel(mkl_batch=False),
    "no pool": CpuKernel(pool=False),
    "no native kernels": CpuKernel(native=False),
    "no float32 compute": CpuKernel(upcast=False),
    "span only": CpuKernel(batching="span"),
    "pairs only": CpuKernel(batching="pairs"),
    "reference": "reference",
    "grouped_mm": "cuda",
}


def layer(num_experts: int) -> SwitchFFN:
    m = SwitchFFN(D_MODEL, D_FF, RoutingConfig(num_experts=num_experts), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    m.router.reset_parameters(0.1, g)
    m.experts.reset_parameters(1.0, g)
    return m.train()


def routed_rows(m: SwitchFFN, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The rows the experts get from the layer's router and capacity dispatch, and their counts per expert."""
    with torch.no_grad():
        plan = dispatch(m.router(x).expert_index, m.num_experts, m.capacity(x.shape[0]))
    return x.index_select(0, plan.token_index), plan.counts


def step(m: SwitchFFN, rows: torch.Tensor, counts: list[int], kernel) -> float:
    """One forward + backward of the experts (what the kernels differ in; router and dispatch are common)."""
    m.zero_grad(set_to_none=True)
    rows = rows.detach().requires_grad_()
    start = time.perf_counter()
    m.experts(rows, counts, kernel).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=positive_int, default=7)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--experts", type=positive_int, nargs="+", default=[8, 64])
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[1024, 4096])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_kernels.md")
    parser.add_argument("--without", nargs="+", default=[], choices=[n for n in VARIANTS if n != "cpu"],
                        help="variants to leave out (the reference loop takes minutes at E >= 128)")
    args = parser.parse_args()
    variants = {n: k for n, k in VARIANTS.items() if n not in args.without}
    rows = []
    for e in args.experts:
        m = layer(e).to(DTYPES[args.dtype])
        for tokens in args.tokens:
            x = torch.randn(tokens, D_MODEL, generator=torch.Generator().manual_seed(1)).to(DTYPES[args.dtype])
            rows_, counts = routed_rows(m, x)
            times = {name: [] for name in variants}
            for name, kernel in variants.items():  # warm-up
                step(m, rows_, counts, kernel)
            orders = round_orders(list(variants))
            for _ in range(args.reps):
                # A fresh order each repetition: whatever a variant leaves behind (the buffer pool's mappings, caches)
                # then falls on every variant alike, not always on the one after it.
                for name in next(orders):
                    times[name].append(step(m, rows_, counts, variants[name]))
            base = statistics.median(times["cpu"])
            rows.append((str(e), str(tokens), f"{1e3 * base:.1f}",
                         *(f"{statistics.median(times[n]) / base:.2f}x" for n in variants if n != "cpu")))
    report(f"Experts' forward + backward on the rows a Switch layer routes them, {args.dtype}, d_model {D_MODEL}, "
           f"d_ff {D_FF}, "
           "capacity factor 1.25, "
           f"{torch.get_num_threads()} threads, median of {args.reps}: each variant's time over the cpu kernel's",
           ["E", "tokens", "cpu ms", *(n for n in variants if n != "cpu")], rows, args.out,
           ["Above 1.00x the trick switched off pays (the variant is slower without it)."])


if __name__ == "__main__":
    main()
