"""Time moeify's SwitchFFN against the dense FFN, transformers' SwitchTransformersSparseMLP and the roofline.

All of them run in one process, interleaved, on identical weights and inputs; the table reports
medians and ratios. Beside them, the experts' GEMMs alone: torch.nn.functional.grouped_mm used directly on the rows
the experts keep (no router, dispatch or combine), the roofline-like reference on CUDA; on the CPU, what the layer
costs above its GEMMs (left out where torch's GEMM has no fast path for the dtype, as bfloat16 on AVX2: seconds a
step). At E = 1, the dense FFN with the least any Switch layer adds to it (a float32 router and the gate's multiply):
the floor of the 1.15x-of-dense target. Batch 1 keeps capacity like-for-like: transformers counts capacity per
sequence, moeify per batch. The roofline is measured in the same run: this machine's fastest GEMM rate and
memory bandwidth; a point's bound is the larger of the FLOP time of capacity factor x the dense
FFN's work and the time to move the expert weights (and in training their gradients). In training the input takes
its gradient, as a layer's inside a model does: each step runs the six GEMMs (three weight reads) that the bounds count.
Each round feeds every module a new batch (BATCHES of them in turn), as a model's layer sees new tokens every step.
Each round runs them back to back (in a fresh order); ratios are the median of the rounds' own ratios, with a
95 % interval, as the host's speed drifts over seconds. Each point runs --reps rounds, or as many as fit in 60 s
(one at least), more for short steps (until they took 3 s, up to 50), and more again while a target's interval
still spans it (up to 60 s a point).
Usage: python benchmarks/bench_layer.py [--reps 5] [--experts ...] [--tokens ...] [--dtypes fp32 bf16]
       [--device cpu|cuda] [--resolve-seconds 60]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from _report import interval, paired, positive_float, positive_int, report, round_orders, verdict
from rich.console import Console
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import SwitchTransformersConfig
from transformers.models.switch_transformers.modeling_switch_transformers import (
    SwitchTransformersSparseMLP,
)

from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.layers.dispatch import dispatch
from moeify.layers.kernels.cpu import dnnl_op, reduced_is_native
from moeify.layers.kernels.cuda import _ContiguousGrad, grouped_mm

D_MODEL, D_FF, CAPACITY_FACTOR = 512, 2048, 1.25  # t5-small's FFN, the paper's training factor
MIN_SECONDS, MAX_REPS = 3.0, 50  # rounds of the modules per point and mode: more while under (see measure)
RESOLVE_SECONDS, RESOLVE_REPS = 60.0, 200  # ... and more again while a target is not resolved, up to these


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CPU = torch.device("cpu")
BATCHES = 4  # distinct inputs per point, one per round in turn (measure())
GROUPED = "grouped_mm"  # the experts' GEMMs alone (GroupedGemms)
ROUTED = "dense + router"  # at E = 1: the dense FFN and the least a Switch layer adds to it (RoutedDense)


def synchronizer(device: torch.device):
    """What a step's clock waits for before it reads the time: the device's queued work (CUDA), or nothing."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, device: torch.device, reps: int) -> list[float]:
    """Seconds per call of fn, `reps` times: on CUDA each the mean of 50 calls queued between two synchronisations
    (one GEMM of the FFN takes tens of microseconds there, as long as a synchronisation)."""
    sync, calls = synchronizer(device), 50 if device.type == "cuda" else 1
    fn()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return times


def gemm_rate(dtype: torch.dtype, device: torch.device, reps: int = 3) -> float:
    """FLOP/s of the fastest GEMM this machine offers at the FFN's shapes: the best of matmul and, on the CPU, oneDNN's
    linear (what transformers and moeify call), and for reduced precision float32 on widened operands, on both of an
    FFN's GEMMs over 8192 tokens."""
    best = 0.0
    for d_in, d_out in ((D_MODEL, D_FF), (D_FF, D_MODEL)):
        a = torch.randn(8192, d_in, dtype=dtype, device=device)
        w = torch.randn(d_out, d_in, dtype=dtype, device=device)
        candidates = [lambda: a @ w.t(), lambda: torch.nn.functional.linear(a, w)]
        if device.type == "cpu" and dtype != torch.float32:  # float32 on the widened operands, widening included
            candidates.append(lambda: torch.nn.functional.linear(a.float(), w.float()).to(dtype))
        if device.type == "cpu" and dnnl_op() is not None and (dtype == torch.float32 or reduced_is_native(dtype)):
            candidates.append(lambda: dnnl_op()(a, w, None, "none", [], ""))
        for fn in candidates:
            best = max(best, 2 * 8192 * d_in * d_out / min(timed(fn, device, reps)))
    return best


def bandwidth(device: torch.device, reps: int = 5) -> float:
    """Bytes/s of the fastest of `reps` passes over 256 MiB: a copy (its bytes read and written), or a read alone (a
    matrix-vector product over it). Reading alone is the faster here (AMX host: 29.1-29.5 GB/s against a copy's
    25.0-25.3, both counted per byte moved), and a forward only reads its weights: a bound from the copy's rate alone
    would sit above what the machine can do. The source is written first: pages never written all map the kernel's
    one zero page, whose reads hit the cache (a copy from them counted 32.7 GB/s, twice the rate of its writes alone).
    A shared host's bandwidth moves with its neighbours: main() takes the best of samples spread over the run, so
    that a busy moment cannot lower the bounds that declare a target out of reach."""
    src, dst = torch.ones(64 << 20, device=device), torch.empty(64 << 20, device=device)
    rows, v = src.view(-1, 2048), torch.ones(2048, device=device)
    copied = 2 * src.nbytes / min(timed(lambda: dst.copy_(src), device, reps))
    return max(copied, src.nbytes / min(timed(lambda: torch.mv(rows, v), device, reps)))


def op_floor(device: torch.device) -> float:
    """Seconds one op costs when its work is nothing: a chain of one-element adds, queued and waited for. On a GPU
    the host's time to issue an op (Python, dispatcher, launch); a step of N ops cannot take less than N times it
    however fast the GPU runs them."""
    t = torch.zeros(1, device=device)
    return min(timed(lambda: [t.add_(1) for _ in range(100)], device, 5)) / 100


class _Ops(TorchDispatchMode):
    """Counts the ops that reach torch's dispatcher (views too: each costs the host's time)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(module: nn.Module, x: tuple[torch.Tensor, ...], backward: bool) -> int:
    """The ops one step of module issues (forward, or forward and backward)."""
    with _Ops() as ops:
        step(module, x, backward)
    return ops.count


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
    reach (half of transformers' median time under routed_bound; at E = 1, RoutedDense's whole interval over 1.15x
    dense, in ratios[ROUTED]); the roofline's from moeify's median."""
    out = []
    for base, target, name in targets(e):
        said = verdict(ratios[base], target)
        if target == 0.5 and said != "met" and 0.5 * h < routed:
            out.append(f"0.5x out of reach ({0.5 * h:.1f} < bound {routed:.1f} ms)")
        elif base == "dense" and said != "met" and ROUTED in ratios and verdict(ratios[ROUTED], target) == "missed":
            out.append(f"1.15x dense out of reach (router and gate alone {statistics.median(ratios[ROUTED]):.2f}x)")
        else:
            out.append({"met": f"met {name}", "missed": f"MISS {name}"}.get(said, f"{name} not resolved"))
    if e <= 32 and tokens >= 1024:
        out.append("met 1.5x roofline" if o <= 1.5 * bound else "MISS 1.5x roofline")
    return "; ".join(out)


class GroupedGemms(nn.Module):
    """The experts' two GEMMs and ReLU over the rows they keep, by torch.nn.functional.grouped_mm used directly, on
    copies of the layer's expert weights: what the layer computes without routing, dispatch or combine. Its input is
    (rows, offsets): a batch's kept rows grouped by expert and each expert's end row (inputs(), outside the clock)."""

    def __init__(self, layer: SwitchFFN) -> None:
        super().__init__()
        self.w_in = nn.Parameter(layer.experts.w_in.detach().clone())  # (E, d_ff, d_model)
        self.w_out = nn.Parameter(layer.experts.w_out.detach().clone())  # (E, d_model, d_ff)

    @staticmethod
    def inputs(layer: SwitchFFN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, offsets) of x's (T, d_model) tokens as the layer's float32 router keeps them."""
        with torch.no_grad():
            plan = dispatch(layer.router(x).expert_index, layer.num_experts, layer.capacity(x.shape[0]))
        offsets = torch.tensor(plan.counts, device=x.device).cumsum(0).to(torch.int32)
        return x.index_select(0, plan.token_index), offsets

    def forward(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        h = torch.relu(grouped_mm(rows, self.w_in.transpose(1, 2), offsets))
        # grouped_mm's backward refuses the zero-stride gradient that .sum() hands back: as the cuda kernel does
        return _ContiguousGrad.apply(grouped_mm(h, self.w_out.transpose(1, 2), offsets))


class RoutedDense(nn.Module):
    """At E = 1, the dense FFN and the least that any eager Switch layer adds to it: the router's logits in float32
    (the paper's selective precision), their softmax and top-1, and the output times the gate (in bfloat16, the casts
    to float32 and back). One expert takes every token, so nothing is dispatched. Its time over the dense FFN's is the
    floor of a Switch layer's over it at E = 1: where that alone exceeds 1.15x, so must any such layer."""

    def __init__(self, dense: nn.Module, router_weight: torch.Tensor) -> None:
        super().__init__()
        self.dense = dense
        self.router = nn.Parameter(router_weight.detach().float().clone())  # (1, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        logits = nn.functional.linear(rows.float(), self.router)
        gate = torch.softmax(logits, dim=-1).max(dim=-1, keepdim=True)[0]
        return (self.dense(rows) * gate.to(x.dtype)).view(x.shape)


def has_reference(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether GroupedGemms runs at a GEMM's speed here: on CUDA grouped_mm's fused kernel takes bfloat16 only (other
    dtypes loop over experts, reading offsets on the host); on the CPU it runs torch's own GEMMs, whose bfloat16 path
    on AVX2 is the generic one (30-90 s a training step at 8192 tokens)."""
    if device.type == "cuda":
        return dtype == torch.bfloat16
    return dtype == torch.float32 or reduced_is_native(dtype)


def build(num_experts: int, tokens: int, device: torch.device):
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
    modules = {"dense": dense, "transformers": hf, "moeify": ours}
    for m in modules.values():
        m.to(device).train()
    return modules


def step(module: nn.Module, x: tuple[torch.Tensor, ...], backward: bool, sync=lambda: None) -> float:
    """Seconds of one step of module on its arguments x (the first takes the gradient)."""
    module.zero_grad(set_to_none=True)
    sync()
    t0 = time.perf_counter()
    if backward:
        x[0].grad = None  # a fresh gradient each step, as the layer below would receive it
        module(*x).sum().backward()
    else:
        with torch.no_grad():
            module(*x)
    sync()
    return time.perf_counter() - t0


def measure(num_experts: int, tokens: int, reps: int, dtype: torch.dtype, device: torch.device = CPU,
            resolve_seconds: float = RESOLVE_SECONDS) -> tuple[dict, tuple[int, int], dict]:
    """Each round's seconds by module and mode, (kept tokens, experts used) of the routing that keeps the least, and on
    CUDA the ops a step of each module issues by mode (on a GPU these layers' steps are bound by issuing them).

    Round r feeds every module batch r % BATCHES: a model's layer sees new tokens every step, so the experts that
    get tokens change. With one batch throughout, whatever a layer leaves for experts without tokens (memory released
    or kept) would cost it nothing, where in training those experts get tokens a few steps later."""
    modules = build(num_experts, tokens, device)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, tokens, D_MODEL, generator=g).to(device) for _ in range(BATCHES)]
    routes = [routing(modules["moeify"], x) for x in xs]
    routed = (min(kept for kept, _ in routes), min(used for _, used in routes))  # the least work: a lower bound
    for x in xs:  # the comparison is only meaningful if both layers agree (in float32: bf16 may flip ties)
        with torch.no_grad():
            diff = (modules["moeify"](x) - modules["transformers"](x)).abs().max().item()
        assert diff < 1e-4, f"moeify and transformers disagree by {diff} at E={num_experts}, T={tokens}"
    inputs = {name: [(x,) for x in xs] for name in modules}
    if has_reference(dtype, device):  # the kept rows as moeify's float32 router chose them, before any cast
        modules[GROUPED] = GroupedGemms(modules["moeify"])
        inputs[GROUPED] = [GroupedGemms.inputs(modules["moeify"], x[0]) for x in xs]
    if dtype != torch.float32:  # moeify's router stays float32 through .to(); transformers routes in float32 too
        modules = {name: m.to(dtype) for name, m in modules.items()}
        inputs = {name: [(x[0].to(dtype), *x[1:]) for x in batches] for name, batches in inputs.items()}
    if num_experts == 1:  # on a copy of the dense FFN (shared weights would be warm in cache for whichever runs second)
        modules[ROUTED] = RoutedDense(copy.deepcopy(modules["dense"]), modules["moeify"].router.weight)
        inputs[ROUTED] = inputs["dense"]
    # Leaves that take their gradient in training (the forward runs without autograd): without it every layer would
    # skip its first linear's input gradient, a sixth of the work that routed_bound() counts.
    inputs = {name: [(x[0].detach().requires_grad_(), *x[1:]) for x in batches] for name, batches in inputs.items()}
    sync = synchronizer(device)
    times: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd+bwd": []} for n in modules}
    ops: dict[str, dict[str, int]] = {n: {} for n in modules}
    names = list(modules)
    for mode, backward in (("fwd", False), ("fwd+bwd", True)):
        for name in names:  # warm-up, on every batch
            for x in inputs[name]:
                step(modules[name], x, backward, sync)
            if device.type == "cuda":
                ops[name][mode] = ops_per_step(modules[name], inputs[name][0], backward)

        def spent() -> float:
            return sum(sum(t[mode]) for t in times.values())

        def unresolved() -> bool:
            return any(verdict(paired(times["moeify"][mode], times[base][mode]), target) == "not resolved"
                       for base, target, _ in targets(num_experts))

        r, orders = 0, round_orders(names)
        # At least `reps` rounds (but one once they took resolve_seconds: torch's bfloat16 baselines on AVX2 take
        # 30-90 s a step at 8192 tokens), more while all of them took under MIN_SECONDS (a median of 3 steps of a
        # few ms moves by a quarter between runs on a shared host, and more rounds of them cost little), and more
        # again while a target's interval spans it: close calls get the rounds, clear ones do not.
        while (r < reps and (r == 0 or spent() < resolve_seconds) or r < MAX_REPS and spent() < MIN_SECONDS
               or r < RESOLVE_REPS and spent() < resolve_seconds and unresolved()):
            for name in next(orders):
                times[name][mode].append(step(modules[name], inputs[name][r % BATCHES], backward, sync))
            r += 1
    return times, routed, ops


def milliseconds(ms: float) -> str:
    """A table's milliseconds: one decimal, two under 1 ms (a GPU's steps and roofline take tens of microseconds)."""
    return f"{ms:.2f}" if ms < 1 else f"{ms:.1f}"


def machine(device: torch.device) -> str:
    """The title's words for where it ran: the GPU's name, or the CPU's widest vector path and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument("--experts", type=positive_int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[64, 1024, 8192])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--device", type=torch.device, default=CPU, help="cpu, or cuda for a GPU's figures")
    parser.add_argument("--resolve-seconds", type=positive_float, default=RESOLVE_SECONDS,
                        help="most seconds a point's rounds may take while a target is not resolved")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_layer.md")
    args = parser.parse_args()
    device = args.device
    bw = bandwidth(device)
    rates = {name: gemm_rate(DTYPES[name], device) for name in args.dtypes}
    floor = op_floor(device) if device.type == "cuda" else None
    header = ["E", "tokens", "dtype", "mode", "rounds", "dense ms", "transformers ms", "moeify ms", "grouped_mm ms",
              "roofline ms", "moeify / transformers", "95 % interval", "moeify / dense", "moeify / grouped_mm",
              "dense + router / dense", "moeify / roofline", "routed bound ms",
              *(["ops dense / transformers / moeify"] if floor else []),
              "targets"]
    points = []
    progress = Console(stderr=True)  # a line per point as it ends: a whole run takes an hour on a 2-core host
    for dtype_name in args.dtypes:
        for e in args.experts:
            for t in args.tokens:
                points.append((e, t, dtype_name, *measure(e, t, args.reps, DTYPES[dtype_name], device,
                                                          args.resolve_seconds)))
                # The bounds take the run's best of each (see bandwidth()): a GEMM sample moved 2,279-2,901 GFLOP/s
                # between runs on the AMX host, and samples at a run's start and end alone decided verdicts by it.
                bw = max(bw, bandwidth(device))
                rates[dtype_name] = max(rates[dtype_name], gemm_rate(DTYPES[dtype_name], device))
                for mode in ("fwd", "fwd+bwd"):
                    ratios = paired(points[-1][3]["moeify"][mode], points[-1][3]["transformers"][mode])
                    progress.log(f"E {e}, {t} tokens, {dtype_name} {mode}: {len(ratios)} rounds, moeify / "
                                 f"transformers {statistics.median(ratios):.2f}x "
                                 "({:.2f}-{:.2f}x)".format(*interval(ratios)))
    rows = []
    for e, t, dtype_name, res, (kept, used), ops in points:
        dtype = DTYPES[dtype_name]
        bases = [b for b in ("dense", "transformers", GROUPED) if b in res]
        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            ms = {n: statistics.median(res[n][mode]) * 1e3 for n in res}
            ratios = {base: paired(res["moeify"][mode], res[base][mode]) for base in bases}
            if ROUTED in res:  # the floor's own ratio to dense, for verdicts()
                ratios[ROUTED] = paired(res[ROUTED][mode], res["dense"][mode])
            ratio = {b: f"{statistics.median(ratios[b]):.2f}x" if b in ratios else "-" for b in (*bases, GROUPED)}
            h, o = ms["transformers"], ms["moeify"]
            bound = roofline(e, t, backward, dtype, rates[dtype_name], bw) * 1e3
            routed = routed_bound(kept, used, backward, dtype, rates[dtype_name], bw) * 1e3
            rows.append((str(e), str(t), dtype_name, mode, str(len(res["moeify"][mode])),
                         milliseconds(ms["dense"]), milliseconds(h), milliseconds(o),
                         milliseconds(ms[GROUPED]) if GROUPED in ms else "-", milliseconds(bound),
                         ratio["transformers"], "{:.2f}-{:.2f}x".format(*interval(ratios["transformers"])),
                         ratio["dense"], ratio[GROUPED],
                         f"{statistics.median(ratios[ROUTED]):.2f}x" if ROUTED in ratios else "-",
                         f"{o / bound:.2f}x", milliseconds(routed),
                         *(["/".join(str(ops[n][mode]) for n in ("dense", "transformers", "moeify"))]
                           if floor else []),
                         verdicts(e, t, ratios, h, o, bound, routed)))
    notes = [f"Measured in this run (the best of samples at its start and after every point): "
             f"fastest GEMM {', '.join(f'{n} {r / 1e9:.0f} GFLOP/s' for n, r in rates.items())}; "
             f"memory bandwidth {bw / 1e9:.1f} GB/s"
             + (f"; one op issued and run with no work {floor * 1e6:.1f} us (the host's floor per op: a step of N "
                "ops takes at least N times it)." if floor else "."),
             "Ratios to transformers, dense and grouped_mm: the median over rounds of the two steps' ratio within a "
             "round, and its 95 % interval (sign test); ms: medians. grouped_mm: the experts' two GEMMs and ReLU alone"
             " on the rows they keep, by torch.nn.functional.grouped_mm used directly ('-' where torch's GEMM has no "
             "fast path for the dtype). dense + router (E = 1): the dense FFN with the least a Switch layer adds, a "
             "float32 router's logits, softmax and top-1 and the gate's multiply, over the dense FFN. Targets: moeify "
             "/ transformers <= 0.5x at E >= 64 and <= 1x everywhere, met where the whole interval is at or under the "
             "target, MISS where all of it is over, else not resolved; moeify / roofline <= 1.5x at >= 1024 tokens for"
             " E <= 32; E = 1 within 1.15x of dense. 'Out of reach': half of transformers' time is below the routed "
             "bound (the kept tokens' FLOPs at the fastest GEMM rate, or the used experts' weights moved once), which "
             "no implementation on this machine can beat; at E = 1, dense + router alone over 1.15x dense in its whole"
             " interval, which no eager Switch layer can beat."]
    report(f"SwitchFFN d_model={D_MODEL} d_ff={D_FF}, capacity factor {CAPACITY_FACTOR}, batch 1, {machine(device)}, "
           f"{args.reps} rounds of the modules or as many as fit in {args.resolve_seconds:.0f} s (more until they "
           f"took {MIN_SECONDS:.0f} s, up to {MAX_REPS}; more again while a target is not resolved, up to "
           f"{args.resolve_seconds:.0f} s)", header, rows, args.out, notes)


if __name__ == "__main__":
    main()
