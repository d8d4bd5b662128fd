"""Search: mesh (data x expert parallel), rank layout, all-to-all algorithm and expert placement."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from moeify.config import expert_capacity
from moeify.errors import MoeifyError
from moeify.planner import placement as place
from moeify.planner.cost import (
    ACTIVATION_BYTES_PER_TOKEN_DIM,
    DEFAULT_EFFICIENCY,
    MEMORY_USABLE_FRACTION,
    OPTIMIZER_BYTES_PER_PARAM,
    Routes,
    Transfer,
    all_to_all,
    compute_us,
    hierarchical_applies,
    ring_all_reduce,
)
from moeify.planner.plan import Estimate, LayerPlan, Mesh, ShardingPlan
from moeify.planner.topology import Topology
from moeify.planner.workload import LayerWork, Workload

LAYOUTS = ("contiguous", "strided")
ALGORITHMS = ("flat", "hierarchical")


@dataclass(frozen=True)
class SearchOptions:
    layouts: tuple[str, ...] = LAYOUTS
    algorithms: tuple[str, ...] = ALGORITHMS
    allow_uneven: bool = False  # let ranks hold different numbers of experts
    replicate_hot: int = 0  # with calibrated loads: hottest experts get a second copy
    efficiency: float = DEFAULT_EFFICIENCY
    expert_parallel: int | None = None  # force this expert-parallel size
    optimizer: str = "adam"  # sets the training state per parameter (OPTIMIZER_BYTES_PER_PARAM)

    @property
    def bytes_per_param(self) -> int:
        return OPTIMIZER_BYTES_PER_PARAM[self.optimizer]


@dataclass
class Candidate:
    ep: int
    layout: str
    groups: np.ndarray  # (dp, ep) global ranks; rows are expert-parallel groups
    layers: list[LayerPlan]
    estimate: Estimate
    busiest: tuple[str, str] | None

    @property
    def fits(self) -> bool:
        return self.estimate.memory_per_rank_bytes <= self.estimate.memory_limit_bytes

    def summary(self) -> dict:
        e = self.estimate
        return {"expert_parallel": self.ep, "data_parallel": self.groups.shape[0], "layout": self.layout,
                "all_to_all": sorted({layer.all_to_all for layer in self.layers}), "step_ms": e.step_ms,
                "all_to_all_ms": e.all_to_all_ms, "lower_bound_ms": e.lower_bound_ms,
                "memory_per_rank_bytes": e.memory_per_rank_bytes, "fits": self.fits}


def mesh_ranks(world: int, ep: int, layout: str) -> np.ndarray:
    """(dp, ep) ranks. Contiguous: an expert group is ep consecutive ranks (inside a host when
    ep <= GPUs per host). Strided: a group takes every dp-th rank, spreading it across hosts."""
    dp = world // ep
    if layout == "contiguous":
        return np.arange(world).reshape(dp, ep)
    if layout == "strided":
        return np.arange(world).reshape(ep, dp).T.copy()
    raise ValueError(f"unknown layout {layout!r}")


def expert_parallel_sizes(world: int, workload: Workload, options: SearchOptions) -> list[int]:
    fewest = min(layer.num_experts for layer in workload.layers)
    sizes = [d for d in range(1, world + 1) if world % d == 0 and d <= fewest
             and (options.allow_uneven or all(layer.num_experts % d == 0 for layer in workload.layers))]
    if options.expert_parallel is not None:
        if options.expert_parallel not in sizes:
            raise MoeifyError(
                f"--expert-parallel {options.expert_parallel} is not possible: it must divide the world size "
                f"{world}, be <= {fewest} experts and divide every layer's experts (or pass --allow-uneven); "
                f"possible: {sizes}")
        return [options.expert_parallel]
    return sizes


class Planner:
    """Evaluates candidates on one topology for one workload."""

    def __init__(self, topology: Topology, workload: Workload, options: SearchOptions = SearchOptions()) -> None:
        self.topology, self.workload, self.options = topology, workload, options
        self.routes = Routes(topology)
        gpus = [topology.graph.nodes[g] for g in topology.gpus]
        self.peak_tflops = min(g["peak_TFLOPs"] for g in gpus)
        self.memory_limit = int(min(g["memory_GB"] for g in gpus) * 1e9 * MEMORY_USABLE_FRACTION)
        self._layer_cache: dict = {}

    @property
    def world(self) -> int:
        return len(self.topology.gpus)

    def _layer(self, layer: LayerWork, groups: np.ndarray, ep: int, layout: str) -> tuple[LayerPlan, Transfer, float, int]:
        key = (layer.num_experts, layer.load, layer.d_model, layer.d_ff, layer.gated, ep, layout)
        if key not in self._layer_cache:
            self._layer_cache[key] = self._evaluate_layer(layer, groups, ep)
        plan, transfer, compute, held = self._layer_cache[key]
        return dataclasses.replace(plan, name=layer.name), transfer, compute, held

    def _evaluate_layer(self, layer: LayerWork, groups: np.ndarray, ep: int):
        w, opts = self.workload, self.options
        loads = layer.loads()
        placement = place.load_aware(loads, ep) if layer.load else place.balanced(layer.num_experts, ep)
        replicas = (place.replicate_hot(placement, loads, ep, opts.replicate_hot)
                    if layer.load and opts.replicate_hot else {e: [r] for e, r in enumerate(placement)})
        routed = np.array(loads) * w.tokens_per_rank * w.top_k  # (E,) assignments per source rank
        kept = routed if w.dropless else np.minimum(routed, expert_capacity(
            w.tokens_per_rank, layer.num_experts, w.capacity_factor, w.min_capacity, w.top_k))
        to_rank = np.zeros(ep)  # tokens each source rank sends to each group rank
        held = np.zeros(ep, dtype=int)
        for e, ranks in replicas.items():
            for r in ranks:
                to_rank[r] += kept[e] / len(ranks)
                held[r] += 1
        send = np.tile(to_rank * w.d_model * w.dtype_bytes, (ep, 1))  # (ep, ep) bytes i -> j
        best = None
        for algorithm in self.options.algorithms:
            if algorithm == "hierarchical" and not hierarchical_applies(self.routes, groups):
                continue
            # dispatch, then combine (the reverse traffic); backward repeats both.
            t = (all_to_all(self.routes, groups, send, algorithm) +
                 all_to_all(self.routes, groups, send.T, algorithm)).scaled(2)
            if best is None or t.time_us < best[1].time_us:
                best = (algorithm, t)
        algorithm, transfer = best
        tokens = ep * to_rank  # tokens each group rank's experts process
        compute = compute_us(3 * tokens.max() * layer.flops_per_token, self.peak_tflops, opts.efficiency)
        plan = LayerPlan(
            name=layer.name, num_experts=layer.num_experts, placement=placement, all_to_all=algorithm,
            replicas={str(e): r for e, r in replicas.items() if len(r) > 1},
            all_to_all_ms=transfer.time_us / 1e3, lower_bound_ms=transfer.bound_us / 1e3, compute_ms=compute / 1e3)
        return plan, transfer, compute, int(held.max())

    def evaluate(self, ep: int, layout: str) -> Candidate:
        w = self.workload
        groups = mesh_ranks(self.world, ep, layout)
        layers, a2a, compute_total, expert_params = [], Transfer(0.0, 0.0), 0.0, 0
        for layer in w.layers:
            plan, transfer, compute, held = self._layer(layer, groups, ep, layout)
            layers.append(plan)
            a2a = a2a + transfer
            compute_total += compute
            expert_params += held * layer.expert_params
        dense_compute = compute_us(6 * w.dense_params * w.tokens_per_rank, self.peak_tflops, self.options.efficiency)
        # Gradients: dense weights are averaged over every rank, experts over their data-parallel group.
        everyone = np.arange(self.world)[None, :]
        allreduce = ring_all_reduce(self.routes, everyone, w.dense_params * w.dtype_bytes) + \
            ring_all_reduce(self.routes, groups.T, expert_params * w.dtype_bytes)
        activations = w.ffn_layers * ACTIVATION_BYTES_PER_TOKEN_DIM * w.tokens_per_rank * w.d_model * w.dtype_bytes // 2
        # Dispatch and combine buffers: E * C rows, about cf * k * T (dropless: the k * T assignments).
        slots = (1.0 if w.dropless else w.capacity_factor) * w.top_k * w.tokens_per_rank
        buffers = len(w.layers) * 2 * slots * w.d_model * w.dtype_bytes
        memory = (w.dense_params + expert_params) * self.options.bytes_per_param + activations + int(buffers)
        estimate = Estimate(
            step_ms=(compute_total + dense_compute + a2a.time_us + allreduce.time_us) / 1e3,
            all_to_all_ms=a2a.time_us / 1e3, lower_bound_ms=a2a.bound_us / 1e3,
            compute_ms=(compute_total + dense_compute) / 1e3, allreduce_ms=allreduce.time_us / 1e3,
            memory_per_rank_bytes=int(memory), memory_limit_bytes=self.memory_limit,
            busiest_link=list(a2a.busiest_link or ()))
        return Candidate(ep, layout, groups, layers, estimate, a2a.busiest_link)

    def candidates(self, progress: Callable[[str, int, int], None] | None = None) -> list[Candidate]:
        sizes = expert_parallel_sizes(self.world, self.workload, self.options)
        if not sizes:
            fewest = min(layer.num_experts for layer in self.workload.layers)
            raise MoeifyError(f"no expert-parallel size divides both the {self.world} GPUs and the {fewest} "
                              "experts: pass --allow-uneven, or change --nodes")
        jobs = []
        for ep in sizes:
            for layout in self.options.layouts:
                # Both layouts coincide when there is one group or one rank per group.
                if layout == "strided" and (ep in (1, self.world)) and "contiguous" in self.options.layouts:
                    continue
                jobs.append((ep, layout))
        out = []
        for i, (ep, layout) in enumerate(jobs):
            out.append(self.evaluate(ep, layout))
            if progress:
                progress("plan", i + 1, len(jobs))
        return out

    def _expert_bytes(self, ep: int) -> int:
        """Training memory of the experts one rank holds at expert-parallel size `ep`."""
        return sum(math.ceil(layer.num_experts / ep) * layer.expert_params
                   for layer in self.workload.layers) * self.options.bytes_per_param

    def _no_fit_message(self, candidates: list[Candidate]) -> str:
        best = min(candidates, key=lambda c: c.estimate.memory_per_rank_bytes)
        need, limit = best.estimate.memory_per_rank_bytes, self.memory_limit
        fixed = need - self._expert_bytes(best.ep)  # dense weights, activations, buffers: the same at any ep
        msg = (f"the model does not fit: at best {need / 1e9:.1f} GB per GPU (expert parallel {best.ep}) "
               f"against {limit / 1e9:.1f} GB usable")
        counts = [layer.num_experts for layer in self.workload.layers]
        widest = min(counts) if self.options.allow_uneven else math.gcd(*counts)  # the largest usable ep
        if fixed + self._expert_bytes(widest) > limit:
            return msg + (f"; even at expert parallel {widest} a GPU needs {(fixed + self._expert_bytes(widest)) / 1e9:.1f}"
                          " GB: lower --tokens-per-rank, or use fewer layers or smaller experts")
        # The fewest hosts whose GPU count admits an expert-parallel size that fits; `widest` fits,
        # so the loop ends at the latest when the GPU count is a multiple of it.
        per_host = self.topology.gpus_per_host
        nodes = len(self.topology.hosts)
        while True:
            nodes += 1
            sizes = expert_parallel_sizes(nodes * per_host, self.workload,
                                          dataclasses.replace(self.options, expert_parallel=None))
            if any(fixed + self._expert_bytes(ep) <= limit for ep in sizes):
                return msg + f"; it fits on {nodes * per_host} GPUs: try --nodes {nodes}"

    def plan(self, progress: Callable[[str, int, int], None] | None = None) -> ShardingPlan:
        candidates = self.candidates(progress)
        fitting = [c for c in candidates if c.fits]
        if not fitting:
            raise MoeifyError(self._no_fit_message(candidates))
        ranked = sorted(fitting, key=lambda c: (c.estimate.step_ms, c.estimate.all_to_all_ms))
        best = ranked[0]
        w, topo = self.workload, self.topology
        first_gpu = topo.graph.nodes[topo.gpus[0]]
        return ShardingPlan(
            mesh=Mesh(ranks=best.groups.tolist()), layout=best.layout, layers=best.layers, estimate=best.estimate,
            model={"name": w.model, "dtype": w.dtype, "tokens_per_rank": w.tokens_per_rank,
                   "capacity_factor": w.capacity_factor, "top_k": w.top_k, "dropless": w.dropless,
                   "moe_layers": len(w.layers),
                   "calibrated": any(layer.load for layer in w.layers), "optimizer": self.options.optimizer},
            topology={"name": topo.name, "hosts": len(topo.hosts), "gpus_per_host": topo.gpus_per_host,
                      "device": first_gpu.get("device", "")},
            alternatives=[c.summary() for c in sorted(candidates, key=lambda c: c.estimate.step_ms)[:8]])
