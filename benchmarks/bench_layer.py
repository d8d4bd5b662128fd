"""Time moeify's SwitchFFN against the dense FFN, transformers' SwitchTransformersSparseMLP and the roofline.

All three run in one process, interleaved, on identical weights and inputs; the table reports
medians and ratios. Batch 1 keeps capacity like-for-like: transformers counts capacity per
sequence, moeify per batch. The roofline is measured in the same run: this machine's fastest GEMM rate and
memory bandwidth; a point's bound is the larger of the FLOP time of capacity factor x the dense
FFN's work and the time to move the expert weights (and in training their gradients).
Each round runs the three back to back (the order rotating); ratios are the median of the rounds' own ratios, with a
95 % interval, as the host's speed drifts over seconds. Each point runs --reps rounds, or as many as fit in 60 s
(one at least), more for short steps (until they took 3 s, up to 50), and more again while a target's interval
still spans it (up to 60 s a point).
Usage: python benchmarks/bench_layer.py [--reps 5] [--experts ...] [--tokens ...] [--dtypes fp32 bf16]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _report import interval, paired, report, verdict
from torch import nn
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)

from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.layers.kernels.cpu import dnnl_op, reduced_is_native

D_MODEL, D_FF, CAPACITY_FACTOR = 512, 2048, 1.25  # t5-small's FFN, the paper's training factor
MIN_SECONDS, MAX_REPS = 3.0, 50  # rounds of the three modules per point and mode: more while under (see measure)
RESOLVE_SECONDS, RESOLVE_REPS = 60.0, 200  # ... and more again while a target is not resolved, up to these


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_rate(dtype: torch.dtype, reps: int = 3) -> float:
    """FLOP/s of the fastest GEMM this machine offers at the FFN's shapes: the best of matmul and oneDNN's linear
    (what transformers and moeify call), and for reduced precision float32 on widened operands, on both of an FFN's
    GEMMs over 8192 tokens."""
    best = 0.0
    for d_in, d_out in ((D_MODEL, D_FF), (D_FF, D_MODEL)):
        a, w = torch.randn(8192, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
        candidates = [lambda: a @ w.t(), lambda: torch.nn.functional.linear(a, w)]
        if dtype != torch.float32:  # float32 on the widened operands, widening included (moeify's path where faster)
            candidates.append(lambda: torch.nn.functional.linear(a.float(), w.float()).to(dtype))
        if dnnl_op() is not None and (dtype == torch.float32 or reduced_is_native(dtype)):  # oneDNN has the dtype
            candidates.append(lambda: dnnl_op()(a, w, None, "none", [], ""))
        for fn in candidates:
            fn()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            best = max(best, 2 * 8192 * d_in * d_out / min(times))
    return best


def bandwidth(reps: int = 5) -> float:
    """Bytes/s of a 256 MiB copy (read + write)."""
    src, dst = torch.empty(64 << 20), torch.empty(64 << 20)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times)


def roofline(num_experts: int, tokens: int, backward: bool, dtype: torch.dtype, rate: float, bw: float) -> float:
    """Seconds no implementation can beat: FLOPs of capacity factor x the dense FFN (x3 with backward) at the
    GEMM rate, or the expert weights read (and, with backward, read again and their gradients written)."""
    flops = CAPACITY_FACTOR * 2 * 2 * tokens * D_MODEL * D_FF * (3 if backward else 1)
    weight_bytes = num_experts * 2 * D_MODEL * D_FF * dtype.itemsize * (3 if backward else 1)
    return max(flops / rate, weight_bytes / bw)


def routed_bound(kept: int, used: int, backward: bool, dtype: torch.dtype, rate: float, bw: float) -> float:
    """Seconds no implementation can beat for the work this routing leaves: the kept tokens' FLOPs at the
    fastest GEMM rate, or the weights of the experts that received tokens moved once (x3 with backward).
    Below the roofline (no capacity slack, unused experts free): the bound that proves a target out of reach."""
    flops = 2 * 2 * kept * D_MODEL * D_FF * (3 if backward else 1)
    weight_bytes = used * 2 * D_MODEL * D_FF * dtype.itemsize * (3 if backward else 1)
    return max(flops / rate, weight_bytes / bw)


def routing(layer: SwitchFFN, x: torch.Tensor) -> tuple[int, int]:
    """(kept tokens, experts with tokens) of layer's top-1 routing of x: what any implementation must compute."""
    with torch.no_grad():
        choice = (x.reshape(-1, D_MODEL).float() @ layer.router.weight.float().t()).argmax(-1)
    counts = torch.bincount(choice, minlength=layer.routing.num_experts)
    return int(counts.clamp(max=layer.capacity(x.shape[1])).sum()), int((counts > 0).sum())


def targets(e: int) -> list[tuple[str, float, str]]:
    """(baseline, ratio moeify's step must not exceed, name) of each paired target at E = e."""
    return ([("transformers", 1.0, "<1x transformers")] + [("transformers", 0.5, "0.5x")] * (e >= 64)
            + [("dense", 1.15, "1.15x dense")] * (e == 1))


def verdicts(e: int, tokens: int, ratios: dict[str, list[float]], h: float, o: float, bound: float,
             routed: float) -> str:
    """Each target that applies to this point, from the paired ratios' intervals: met, MISS, not resolved, or out of
    reach (half of transformers' median time under routed_bound); the roofline's from moeify's median."""
    out = []
    for base, target, name in targets(e):
        said = verdict(ratios[base], target)
        if target == 0.5 and said != "met" and 0.5 * h < routed:
            out.append(f"0.5x out of reach ({0.5 * h:.1f} < bound {routed:.1f} ms)")
        else:
            out.append({"met": f"met {name}", "missed": f"MISS {name}"}.get(said, f"{name} not resolved"))
    if e <= 32 and tokens >= 1024:
        out.append("met 1.5x roofline" if o <= 1.5 * bound else "MISS 1.5x roofline")
    return "; ".join(out)


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


def measure(num_experts: int, tokens: int, reps: int, dtype: torch.dtype) -> tuple[dict, tuple[int, int]]:
    """Each round's seconds by module and mode, and (kept tokens, experts used) of the routing."""
    modules = build(num_experts, tokens)
    x = torch.randn(1, tokens, D_MODEL, generator=torch.Generator().manual_seed(1))
    routed = routing(modules["moeify"], x)
    with torch.no_grad():  # the comparison is only meaningful if both layers agree (in float32: bf16 may flip ties)
        diff = (modules["moeify"](x) - modules["transformers"](x)).abs().max().item()
    assert diff < 1e-4, f"moeify and transformers disagree by {diff} at E={num_experts}, T={tokens}"
    if dtype != torch.float32:  # moeify's router stays float32 through .to(); transformers routes in float32 too
        modules = {name: m.to(dtype) for name, m in modules.items()}
        x = x.to(dtype)
    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd+bwd": []} for n in modules}
    names = list(modules)
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        for name in names:  # warm-up
            step(modules[name], x, backward)

        def spent() -> float:
            return sum(sum(t[mode]) for t in times.values())

        def unresolved() -> bool:
            return any(verdict(paired(times["moeify"][mode], times[base][mode]), target) == "not resolved"
                       for base, target, _ in targets(num_experts))

        r = 0
        # At least `reps` rounds (but one once they took RESOLVE_SECONDS: torch's bfloat16 baselines on AVX2 take
        # 30-90 s a step at 8192 tokens), more while all of them took under MIN_SECONDS (a median of 3 steps of a
        # few ms moves by a quarter between runs on a shared host, and more rounds of them cost little), and more
        # again while a target's interval spans it: close calls get the rounds, clear ones do not.
        while (r < reps and (r == 0 or spent() < RESOLVE_SECONDS) or r < MAX_REPS and spent() < MIN_SECONDS
               or r < RESOLVE_REPS and spent() < RESOLVE_SECONDS and unresolved()):
            for name in names[r % 3:] + names[:r % 3]:  # rotate the order each repetition
                times[name][mode].append(step(modules[name], x, backward))
            r += 1
    return times, routed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 1024, 8192])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_layer.md")
    args = parser.parse_args()
    bw = bandwidth()
    rates = {name: gemm_rate(DTYPES[name]) for name in args.dtypes}
    header = ["E", "tokens", "dtype", "mode", "rounds", "dense ms", "transformers ms", "moeify ms", "roofline ms",
              "moeify / transformers", "95 % interval", "moeify / dense", "moeify / roofline", "routed bound ms",
              "targets"]
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for e in args.experts:
            for t in args.tokens:
                res, (kept, used) = measure(e, t, args.reps, dtype)
                for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                    d, h, o = (statistics.median(res[n][mode]) * 1e3 for n in ("dense", "transformers", "moeify"))
                    ratios = {base: paired(res["moeify"][mode], res[base][mode]) for base in ("dense", "transformers")}
                    bound = roofline(e, t, backward, dtype, rates[dtype_name], bw) * 1e3
                    routed = routed_bound(kept, used, backward, dtype, rates[dtype_name], bw) * 1e3
                    rows.append((str(e), str(t), dtype_name, mode, str(len(res["moeify"][mode])), f"{d:.1f}",
                                 f"{h:.1f}", f"{o:.1f}", f"{bound:.1f}",
                                 f"{statistics.median(ratios['transformers']):.2f}x",
                                 "{:.2f}-{:.2f}x".format(*interval(ratios["transformers"])),
                                 f"{statistics.median(ratios['dense']):.2f}x", f"{o / bound:.2f}x", f"{routed:.1f}",
                                 verdicts(e, t, ratios, h, o, bound, routed)))
    notes = [f"Measured in this run: fastest GEMM {', '.join(f'{n} {r / 1e9:.0f} GFLOP/s' for n, r in rates.items())}; "
             f"memory bandwidth {bw / 1e9:.1f} GB/s.",
             "Ratios to transformers and dense: the median over rounds of the two steps' ratio within a round, and its "
             "95 % interval (sign test); ms: medians. Targets: moeify / transformers <= 0.5x at E >= 64 and <= 1x "
             "everywhere, met where the whole interval is at or under the target, MISS where all of it is over, "
             "else not resolved; moeify / roofline <= 1.5x at >= 1024 tokens for E <= 32; E = 1 within 1.15x of "
             "dense. 'Out of reach': half of transformers' time is below the routed bound (the kept tokens' FLOPs at "
             "the fastest GEMM rate, or the used experts' weights moved once), which no implementation on this "
             "machine can beat."]
    report(f"SwitchFFN d_model={D_MODEL} d_ff={D_FF}, capacity factor {CAPACITY_FACTOR}, batch 1, "
           f"{torch.get_num_threads()} threads, {args.reps} rounds of the three or as many as fit in "
           f"{RESOLVE_SECONDS:.0f} s (more until they took {MIN_SECONDS:.0f} s, up to {MAX_REPS}; more again while a "
           f"target is not resolved, up to {RESOLVE_SECONDS:.0f} s)", header, rows, args.out, notes)


if __name__ == "__main__":
    main()
