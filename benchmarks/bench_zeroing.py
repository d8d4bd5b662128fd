"""Zeroing the weight gradient's experts without tokens: the ways of doing it against each other, alone and inside the
Switch layer's training step, beside transformers' layer.

The stacked (E, out, in) weight gradient holds every expert, and those that got no tokens in a step must read as
zero. Two tables, one run, 2 threads:
- the rate of each way over a warm 1 GiB pooled buffer: torch's zero_ (ordinary stores, which read each line before
  writing it), the native loops' streamed stores (what the cpu kernel ships) on one and on two threads, and pages
  handed back to the kernel (memory.zero_pages_), which cost nothing at once and are zeroed again by the kernel when
  next written: that rate is the bytes over the extra time of writing them again;
- float32 training steps of t5-small's FFN at --tokens over --experts, a new batch each step (as in training, where
  the experts without tokens change), with each way in turn and transformers' layer, interleaved round by round; the
  ratios pair each round with the shipped way's.
Usage: python benchmarks/bench_zeroing.py [--experts 64 128 256] [--tokens 64] [--rounds 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from _report import interval, paired, positive_int, report
from bench_layer import D_MODEL, build, step

from moeify.layers import memory
from moeify.layers.kernels import native

WAYS = {  # how Skinny.zero_ (the cpu kernel's zeroing of experts without rows) does it
    "streamed (shipped)": None,
    "written (zero_)": lambda self, t: t.zero_(),
    "pages handed back": lambda self, t: memory.zero_pages_(t),
}
SHIPPED = "streamed (shipped)"
BATCHES = 8  # in turn, so that the experts without tokens change from step to step
STEPS = 10  # timed steps per way per round, after WARMUP (which lets a way inherit the buffers' pages as they are)
WARMUP = 3


def zeroing(way: str):
    """The cpu kernel zeroes the experts without rows `way` while inside."""
    return contextlib.nullcontext() if WAYS[way] is None else mock.patch.object(native.Skinny, "zero_", WAYS[way])


def rates(gib: int = 1, reps: int = 5) -> list[tuple[str, str, str]]:
    """(way, threads, GB/s) over a warm pooled buffer of `gib` GiB, the best of `reps`."""
    kernel = native.skinny()
    buffer = memory.empty((gib << 28,), torch.float32, torch.device("cpu"))[0]
    nbytes = buffer.numel() * 4

    def best(fn, threads: int = 2) -> float:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            times = []
            for _ in range(reps):
                buffer.fill_(1.0)
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)
        finally:
            torch.set_num_threads(previous)

    rows = [("torch zero_", "2", f"{nbytes / best(buffer.zero_) / 1e9:.1f}")]
    rows += [("streamed stores", str(n), f"{nbytes / best(lambda: kernel.zero_(buffer), n) / 1e9:.1f}") for n in (1, 2)]
    # A page handed back is zeroed by the kernel when next written: its cost is the write's extra time.
    rewrite = best(lambda: (memory.zero_pages_(buffer), buffer.fill_(2.0))) - best(lambda: buffer.fill_(2.0))
    rows.append(("pages handed back: the next write's extra time", "2", f"{nbytes / max(rewrite, 1e-9) / 1e9:.1f}"))
    buffer = None  # back to the cache, which empty_cache() unmaps
    memory.empty_cache()
    return rows


def steps(num_experts: int, tokens: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per training step by way (and transformers), one mean of STEPS steps per round."""
    modules = build(num_experts, tokens, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    xs = [(torch.randn(1, tokens, D_MODEL, generator=g).requires_grad_(),) for _ in range(BATCHES)]
    runs = [(way, modules["moeify"]) for way in WAYS] + [("transformers", modules["transformers"])]
    seconds: dict[str, list[float]] = {name: [] for name, _ in runs}
    n = 0
    for _ in range(rounds):
        for name, module in runs:
            with zeroing(name) if name in WAYS else contextlib.nullcontext():
                for _ in range(WARMUP):
                    step(module, xs[n % BATCHES], True)
                    n += 1
                total = 0.0
                for _ in range(STEPS):
                    total += step(module, xs[n % BATCHES], True)
                    n += 1
            seconds[name].append(total / STEPS)
    memory.empty_cache()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=positive_int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--tokens", type=positive_int, default=64)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_zeroing.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if native.skinny() is None:
        raise SystemExit("bench_zeroing: the native kernels do not load here (an x86 CPU and a C++ compiler are "
                         "needed), so the cpu kernel zeroes without streamed stores; nothing to compare")
    ways = "; ".join(f"{way}, {threads} thread{'s' * (threads != '1')}: {gbs} GB/s" for way, threads, gbs in rates())
    notes = [f"Rates over a warm 1 GiB pooled buffer (huge pages where the kernel gives them), the best of 5: {ways}."]
    rows = []
    for num_experts in args.experts:
        seconds = steps(num_experts, args.tokens, args.rounds)
        for name, times in seconds.items():
            ratios = paired(times, seconds[SHIPPED])
            low, high = interval(ratios)
            rows.append((str(num_experts), str(args.tokens), name, str(args.rounds),
                         f"{statistics.median(times) * 1e3:.1f}", f"{statistics.median(ratios):.2f}x",
                         f"{low:.2f}-{high:.2f}x"))
    report(f"Zeroing the experts without tokens: t5-small's FFN (d_model {D_MODEL}), float32 training steps, a new "
           f"batch each step, 2 threads", ["E", "tokens", "zeroing", "rounds", "ms / step", "/ streamed",
                                           "95 % interval"], rows, args.out, notes)


if __name__ == "__main__":
    main()
