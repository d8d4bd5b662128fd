"""Where a training step's time goes: torch.profiler over steps of a converted model, by the Switch layer's phases.

SwitchFFN names its phases with record_function (moeify::router, ::dispatch, ::experts, ::combine; the
collector's hook is moeify::router_losses); the rest of the forward is the dense model (attention, layer
norms, the dense FFNs left), and backward and the optimizer step are timed as wholes.
On CUDA (--device cuda, --dtype bf16 casts the model; its routers stay float32) the scopes time the host, which
queues the kernels: what a step of these small layers waits on there, as the GPU finishes each kernel sooner than
the host can queue the next; the wall time waits for the GPU's queue at the end of the steps.
Usage: python benchmarks/profile_step.py [--preset t5-small] [--experts 8] [--steps 3] [--device cpu|cuda]
       [--dtype fp32|bf16] [--out FILE]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _report import positive_int, report
from bench_layer import DTYPES, machine, synchronizer
from torch.profiler import ProfilerActivity, profile, record_function

from moeify.checkpoint.sources import load_dense
from moeify.config import MoEConfig
from moeify.conversion.pipeline import convert
from moeify.training.config import DataConfig, TrainConfig
from moeify.training.data import prepare_data
from moeify.training.loop import Trainer

PHASES = ["moeify::router", "moeify::router_losses", "moeify::dispatch", "moeify::experts", "moeify::combine"]
STEP = ["step::forward", "step::backward", "step::optimizer"]


class ProfiledTrainer(Trainer):
    """Trainer.train_step with its three parts named for the profiler."""

    def train_step(self, batch):
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._routing() as routing, record_function("step::forward"):
            loss = self.model(**batch).loss + routing.total()
        with record_function("step::backward"):
            loss.backward()
        with record_function("step::optimizer"):
            self.optimizer.step()
        self.step += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-small")
    parser.add_argument("--experts", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=3)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu, or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the model's dtype (routers: float32)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "profile_step.md")
    args = parser.parse_args()
    model = convert(load_dense(args.preset).model, MoEConfig(num_experts=args.experts), inplace=True)
    data = prepare_data(model, DataConfig(seq_len=args.seq_len, batch_size=args.batch))
    batches = [{k: t.to(args.device) for k, t in next(data.train).items()} for _ in range(args.steps + 1)]
    trainer = ProfiledTrainer(model.to(args.device, DTYPES[args.dtype]), TrainConfig(steps=10**6))
    sync = synchronizer(args.device)
    trainer.train_step(batches[0])  # warm-up: the optimizer's state, first allocations
    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches[1:]:
            trainer.train_step(batch)
        sync()
    wall = (time.perf_counter() - start) / args.steps
    totals = {e.key: e.cpu_time_total / 1e3 / args.steps for e in prof.key_averages() if e.key in PHASES + STEP}
    step_ms = sum(totals.get(k, 0.0) for k in STEP)
    rows = [(name, f"{totals.get(name, 0.0):.1f}", f"{totals.get(name, 0.0) / step_ms:.1%}") for name in STEP]
    # The losses' hook runs inside the router's call: it is part of moeify::router's time.
    rows += [(f"  {'  ' if name == 'moeify::router_losses' else ''}{name}", f"{totals.get(name, 0.0):.1f}",
              f"{totals.get(name, 0.0) / step_ms:.1%}") for name in PHASES]
    moe = sum(totals.get(k, 0.0) for k in PHASES if k != "moeify::router_losses")
    rows.append(("  rest of the forward (dense model)", f"{totals.get('step::forward', 0.0) - moe:.1f}",
                 f"{(totals.get('step::forward', 0.0) - moe) / step_ms:.1%}"))
    report(f"Training step of {args.preset} -> Switch-{args.experts}, batch {args.batch} x {args.seq_len}, "
           f"{args.dtype}, {machine(args.device)}, mean of {args.steps} profiled steps ({1e3 * wall:.0f} ms wall each)",
           ["part", "ms per step", "share"], rows, args.out,
           ["The profiler's own overhead is in these times; backward is not split by phase (autograd runs it "
            "outside the forward's scopes)."])


if __name__ == "__main__":
    main()
