"""Measure torch.distributed all_to_all_single on gloo (2 and 4 local processes) and check the
planner's cost model against it.

It fits the `localhost-gloo` link model (per-hop latency, per-message overhead, bandwidth) by
least squares over all points, then reports predicted / measured for each world size and message
size. Usage: python benchmarks/bench_alltoall.py [--reps 40] [--out FILE]
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
from _report import positive_int, report

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
        for _ in range(10):  # warm up: connections, buffers, the scheduler's view of the processes
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
    """(latency us, overhead us, bandwidth GB/s) minimising the worst predicted / measured ratio of
    T = 2 * latency + (world - 1) * overhead * stretch + bytes_moved / bandwidth,
    the `localhost-gloo` model in moeify/planner/hardware.py.

    The ranks share the machine's copy bandwidth, so all bytes moved count: each rank sends
    (world - 1) / world of its `s` bytes to others, (world - 1) * s in all. With more ranks than
    cores, processes time-share the cores: stretch = max(1, world / cores). Oversubscribed gloo
    is erratic for small messages, so the fit is minimax over a grid rather than least squares,
    which would let a few slow points dominate.
    """
    cores = os.cpu_count() or 1
    w = np.array([p[0] for p in points], dtype=float)
    terms = np.stack([np.full_like(w, 2.0), (w - 1) * np.maximum(1.0, w / cores),
                      np.array([(p[0] - 1) * p[1] / 1e3 for p in points])])  # (3, points)
    measured = np.array([p[2] for p in points])
    latency = np.concatenate([[0.0], np.geomspace(1, 2000, 40)])
    overhead = np.concatenate([[0.0], np.geomspace(1, 5000, 60)])
    inv_bw = 1 / np.geomspace(0.05, 200, 80)
    grid = np.stack(np.meshgrid(latency, overhead, inv_bw, indexing="ij"), -1).reshape(-1, 3)  # (G, 3)
    ratio = (grid @ terms) / measured  # (G, points)
    worst = np.maximum(ratio, 1 / np.maximum(ratio, 1e-12)).max(1)
    lat, over, inv = grid[worst.argmin()]
    return float(lat), float(over), float(1 / inv)


def predict(world: int, size: int, latency: float, overhead: float, bw: float) -> float:
    from moeify.planner.cost import Routes, all_to_all
    from moeify.planner.topology import localhost_gloo

    routes = Routes(localhost_gloo(world, bw_GBps=bw, latency_us=latency, message_overhead_us=overhead))
    send = np.full((world, world), size / world)
    return all_to_all(routes, np.arange(world)[None, :], send, "flat").time_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=positive_int, default=40)
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
