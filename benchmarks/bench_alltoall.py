"""Measure torch.distributed all_to_all_single on gloo (2 and 4 local processes) and check the
planner's cost model against it.

It fits the `localhost-gloo` link model (per-hop latency, per-message overhead, bandwidth) by
least squares over all points, then reports predicted / measured for each world size and message
size. Usage: python benchmarks/bench_alltoall.py [--reps 15] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _report import report

SIZES = [4 << 10, 64 << 10, 512 << 10, 2 << 20, 8 << 20, 32 << 20]  # bytes each rank sends in total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, reps: int, result_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for size in SIZES:
        send = torch.full((size // 4,), float(rank))
        recv = torch.empty_like(send)
        for _ in range(3):
            dist.all_to_all_single(recv, send)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(recv, send)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the exchange ends when the slowest rank ends
            times.append(elapsed.item())
        expected = torch.arange(world, dtype=torch.float32).repeat_interleave(size // 4 // world)
        assert torch.equal(recv[: expected.numel()], expected), "all_to_all_single returned wrong data"
        rows.append((size, statistics.median(times) * 1e6))
    if rank == 0:
        Path(result_file).write_text("\n".join(f"{s} {t}" for s, t in rows))
    dist.destroy_process_group()


def measure(world: int, reps: int) -> list[tuple[int, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.txt")
        mp.spawn(_worker, args=(world, _free_port(), reps, out), nprocs=world, join=True)
        return [(int(s), float(t)) for s, t in (line.split() for line in Path(out).read_text().splitlines())]


def fit(points: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares for T = 2 * latency + (world - 1) * overhead + bytes_moved / bandwidth.

    The ranks share the machine's copy bandwidth, so all bytes moved count: each rank sends
    (world - 1) / world of its `s` bytes to others, (world - 1) * s in all.
    """
    a = np.array([[2.0, w - 1.0, (w - 1) * s / 1e3] for w, s, _ in points])  # bandwidth in GB/s
    t = np.array([m for *_, m in points])
    # Relative errors matter at every size, so weight each point by 1 / measured time.
    (lat, overhead, inv_bw), *_ = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)
    return max(lat, 0.0), max(overhead, 0.0), 1.0 / max(inv_bw, 1e-9)


def predict(world: int, size: int, latency: float, overhead: float, bw: float) -> float:
    from moeify.planner.cost import Routes, all_to_all
    from moeify.planner.topology import localhost_gloo

    routes = Routes(localhost_gloo(world, bw_GBps=bw, latency_us=latency, message_overhead_us=overhead))
    send = np.full((world, world), size / world)
    return all_to_all(routes, np.arange(world)[None, :], send, "flat").time_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_alltoall.md")
    args = parser.parse_args()
    points = [(w, s, t) for w in (2, 4) for s, t in measure(w, args.reps)]
    latency, overhead, bw = fit(points)
    title = (f"gloo all_to_all_single, {os.cpu_count()} cores: measured vs the planner's model "
             f"(fit: latency {latency:.1f} us per hop, {overhead:.1f} us per message, {bw:.2f} GB/s)")
    rows, worst = [], 1.0
    for w, s, t in points:
        p = predict(w, s, latency, overhead, bw)
        worst = max(worst, p / t, t / p)
        rows.append((str(w), f"{s:,}", f"{t:.0f}", f"{p:.0f}", f"{p / t:.2f}"))
    notes = [f"worst ratio {worst:.2f}x: {'within' if worst <= 2 else 'NOT within'} 2x at every size",
             f"constants for moeify/planner/topology.py: GLOO_LATENCY_US = {latency:.1f}, "
             f"GLOO_MESSAGE_OVERHEAD_US = {overhead:.1f}, GLOO_BW_GBPS = {bw:.2f}"]
    report(title, ["ranks", "bytes per rank", "measured us", "predicted us", "predicted / measured"], rows,
           args.out, notes)


if __name__ == "__main__":
    main()
