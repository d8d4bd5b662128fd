"""The study's step times, measured quietly: dense, Switch-8 and Switch-16 training steps interleaved in one process.

The study's own wall clocks ran on a shared machine; this gives the cost of a step on this machine with the
study's settings (t5-tiny, 16 x 64 tokens, AdamW, fp32, one thread), to compare the variants at equal time.
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study/step_time.py [--rounds 5] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from moeify.checkpoint.sources import load_dense
from moeify.config import MoEConfig
from moeify.conversion.pipeline import convert
from moeify.training.config import DataConfig, TrainConfig
from moeify.training.data import prepare_data
from moeify.training.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import report  # noqa: E402

VARIANTS = {"dense": None, "Switch-8": 8, "Switch-16": 16}


def trainer(experts: int | None) -> Trainer:
    model = load_dense("t5-tiny").model
    if experts is not None:
        model = convert(model, MoEConfig(num_experts=experts, init="random"), inplace=True)
    return Trainer(model, TrainConfig(steps=10**6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "docs/results/step_time.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainers = {name: trainer(e) for name, e in VARIANTS.items()}
    data = prepare_data(trainers["dense"].model, DataConfig(seq_len=64, batch_size=16))
    batches = [next(data.train) for _ in range(args.steps)]
    for t in trainers.values():  # warm-up: allocations, the optimizer's state
        t.train_step(batches[0])
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.rounds):  # interleaved: every variant sees the same machine state
        for name, t in trainers.items():
            start = time.perf_counter()
            for batch in batches:
                t.train_step(batch)
            times[name].append((time.perf_counter() - start) / args.steps)
    dense = statistics.median(times["dense"])
    rows = [(name, f"{1e3 * statistics.median(ts):.1f} ms", f"{1e3 * min(ts):.1f} ms",
             f"{statistics.median(ts) / dense:.2f}x") for name, ts in times.items()]
    report(f"Training step of t5-tiny, 16 x 64 tokens, one thread: median of {args.rounds} interleaved rounds "
           f"of {args.steps} steps", ["variant", "median step", "fastest round", "vs dense"], rows, args.out)
    # What tables.py reads to compare the variants at equal time.
    args.out.with_suffix(".json").write_text(json.dumps(
        {name: statistics.median(ts) for name, ts in times.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
