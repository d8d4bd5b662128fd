"""Time moeify's SwitchFFN against the dense FFN and transformers' SwitchTransformersSparseMLP.

All three run in one process, interleaved, on identical weights and inputs; the table reports
medians and ratios. Batch 1 keeps capacity like-for-like: transformers counts capacity per
sequence, moeify per batch. Usage: python benchmarks/bench_layer.py [--reps 7] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)

from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN

D_MODEL, D_FF, CAPACITY_FACTOR = 512, 2048, 1.25  # t5-small's FFN, the paper's training factor


def build(num_experts: int, tokens: int):
    routing = RoutingConfig(num_experts=num_experts, capacity_factor=CAPACITY_FACTOR, min_capacity=4)
    ours = SwitchFFN(D_MODEL, D_FF, routing, nn.ReLU())
    g = torch.Generator().manual_seed(0)
    ours.router.reset_parameters(0.1, g)
    ours.experts.reset_parameters(1.0, g)
    capacity = ours.capacity(tokens)
    hf_config = SwitchTransformersConfig(
        d_model=D_MODEL, d_ff=D_FF, num_experts=num_experts, expert_capacity=capacity,
        dense_act_fn="relu", router_jitter_noise=0.0, dropout_rate=0.0, router_bias=False)
    hf = SwitchTransformersSparseMLP(hf_config)
    dense = nn.Sequential(nn.Linear(D_MODEL, D_FF, bias=False), nn.ReLU(), nn.Linear(D_FF, D_MODEL, bias=False))
    with torch.no_grad():
        hf.router.classifier.weight.copy_(ours.router.weight)
        for i in range(num_experts):
            hf.experts[f"expert_{i}"].wi.weight.copy_(ours.experts.w_in[i])
            hf.experts[f"expert_{i}"].wo.weight.copy_(ours.experts.w_out[i])
        dense[0].weight.copy_(ours.experts.w_in[0])
        dense[2].weight.copy_(ours.experts.w_out[0])
    for m in (ours, hf, dense):
        m.train()
    return {"dense": dense, "transformers": hf, "moeify": ours}


def step(module: nn.Module, x: torch.Tensor, backward: bool) -> float:
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    if backward:
        module(x).sum().backward()
    else:
        with torch.no_grad():
            module(x)
    return time.perf_counter() - t0


def measure(num_experts: int, tokens: int, reps: int) -> dict[str, dict[str, float]]:
    modules = build(num_experts, tokens)
    x = torch.randn(1, tokens, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the comparison is only meaningful if both layers agree
        diff = (modules["moeify"](x) - modules["transformers"](x)).abs().max().item()
    assert diff < 1e-4, f"moeify and transformers disagree by {diff} at E={num_experts}, T={tokens}"
    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd+bwd": []} for n in modules}
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        for name, m in modules.items():  # warm-up
            step(m, x, backward)
        for r in range(reps):
            names = list(modules)
            for name in names[r % 3:] + names[:r % 3]:  # rotate the order each repetition
                times[name][mode].append(step(modules[name], x, backward))
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_layer.md")
    args = parser.parse_args()

    table = Table(title=f"SwitchFFN d_model={D_MODEL} d_ff={D_FF}, capacity factor {CAPACITY_FACTOR}, "
                        f"{torch.get_num_threads()} threads, median of {args.reps}")
    for col in ("E", "tokens", "mode", "dense ms", "transformers ms", "moeify ms",
                "moeify / transformers", "moeify / dense"):
        table.add_column(col, justify="right")
    rows = []
    for e in args.experts:
        for t in args.tokens:
            res = measure(e, t, args.reps)
            for mode in ("fwd", "fwd+bwd"):
                d, h, o = (res[n][mode] * 1e3 for n in ("dense", "transformers", "moeify"))
                row = (str(e), str(t), mode, f"{d:.1f}", f"{h:.1f}", f"{o:.1f}", f"{o / h:.2f}x", f"{o / d:.2f}x")
                table.add_row(*row)
                rows.append(row)
    console = Console()
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = [c.header for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    args.out.write_text(f"{table.title}\n\n" + "\n".join(lines) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
