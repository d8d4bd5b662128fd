"""Cost model: all-to-all (flat and hierarchical), compute, all-reduce and memory, with lower bounds.

Units: bytes, microseconds, GB/s (1e9 B/s per direction, so 1 GB/s moves 1e3 bytes per us).
Every time estimate comes with a physical lower bound it can never beat: the injection bandwidth
of each GPU, and the bandwidth of the links that leave each host (its NICs).
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from moeify.planner.topology import Topology

# Per-message software cost of a collective step (NCCL launches and proxies are ~a few us).
DEFAULT_MESSAGE_OVERHEAD_US = 2.0


@dataclass(frozen=True)
class Transfer:
    """Modelled time of one communication step and the bound it cannot beat."""

    time_us: float
    bound_us: float
    busiest_link: tuple[str, str] | None = None

    def __add__(self, other: "Transfer") -> "Transfer":
        link = self.busiest_link if self.time_us >= other.time_us else other.busiest_link
        return Transfer(self.time_us + other.time_us, self.bound_us + other.bound_us, link)

    def scaled(self, k: float) -> "Transfer":
        return Transfer(self.time_us * k, self.bound_us * k, self.busiest_link)


NO_TRANSFER = Transfer(0.0, 0.0)


class Routes:
    """Shortest paths between all GPU pairs, as arrays of directed link ids.

    A link is full duplex: undirected edge k is link 2k one way and 2k+1 the other, each with
    the edge's per-direction bandwidth. Paths minimise latency + time per MB, so bulk traffic
    takes NVLink over PCIe and the NIC nearest the GPU.
    """

    def __init__(self, topology: Topology) -> None:
        g = topology.graph
        self.topology = topology
        self.gpus = topology.gpus
        self.n = len(self.gpus)
        edges = list(g.edges(data=True))
        self.link_names = [(u, v) for u, v, _ in edges for _ in (0, 1)]
        self.link_names[1::2] = [(v, u) for u, v, _ in edges]
        bw = np.array([d["bw_GBps"] for _, _, d in edges for _ in (0, 1)], dtype=float)
        self.bytes_per_us = bw * 1e3  # (links,)
        latency = np.array([d["latency_us"] for _, _, d in edges for _ in (0, 1)], dtype=float)
        self.offsets, self.link_ids = _shortest_paths(g, self.gpus, edges)
        hop_latency = np.concatenate([[0.0], np.cumsum(latency[self.link_ids])])
        self.path_latency_us = hop_latency[self.offsets[1:]] - hop_latency[self.offsets[:-1]]  # (n*n,)
        self.overhead_us = float(g.graph.get("message_overhead_us", DEFAULT_MESSAGE_OVERHEAD_US))

        # Bounds: what each GPU can inject, and what can leave each host.
        host_of = nx.get_node_attributes(g, "host")
        self.gpu_host = np.array([topology.hosts.index(host_of[gpu]) for gpu in self.gpus])
        self.injection_bytes_per_us = np.array(
            [sum(g.edges[gpu, nb]["bw_GBps"] for nb in g.neighbors(gpu)) * 1e3 for gpu in self.gpus])
        self.host_cut_bytes_per_us = np.array([
            sum(d["bw_GBps"] for u, v, d in edges if (host_of.get(u) == h) != (host_of.get(v) == h)) * 1e3
            for h in topology.hosts])

    def transfer(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> Transfer:
        """All messages src[i] -> dst[i] of nbytes[i] bytes, sent at the same time (ranks as ints)."""
        src, dst, nbytes = _moving(src, dst, nbytes)
        if src.size == 0:
            return NO_TRANSFER
        pair = src * self.n + dst
        starts, ends = self.offsets[pair], self.offsets[pair + 1]
        lengths = ends - starts
        # Concatenate the link ranges of every message without a Python loop.
        flat = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        load = np.bincount(self.link_ids[flat], weights=np.repeat(nbytes, lengths),
                           minlength=len(self.bytes_per_us))  # (links,) bytes
        link_time = load / self.bytes_per_us
        busiest = int(link_time.argmax())
        peers = np.bincount(src, minlength=self.n).max()
        latency = self.path_latency_us[pair].max() + self.overhead_us * peers
        return Transfer(float(link_time[busiest] + latency), self.bound(src, dst, nbytes),
                        self.link_names[busiest])

    def bound(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> float:
        """No schedule beats the GPUs' injection bandwidth or the links leaving each host."""
        src, dst, nbytes = _moving(src, dst, nbytes)
        out = np.bincount(src, weights=nbytes, minlength=self.n)
        into = np.bincount(dst, weights=nbytes, minlength=self.n)
        bound = max((out / self.injection_bytes_per_us).max(), (into / self.injection_bytes_per_us).max())
        hs, hd = self.gpu_host[src], self.gpu_host[dst]
        crossing = hs != hd
        if crossing.any():
            hosts = len(self.host_cut_bytes_per_us)
            leave = np.bincount(hs[crossing], weights=nbytes[crossing], minlength=hosts)
            enter = np.bincount(hd[crossing], weights=nbytes[crossing], minlength=hosts)
            cut = self.host_cut_bytes_per_us
            bound = max(bound, (leave / cut).max(), (enter / cut).max())
        return float(bound)


def _shortest_paths(g: nx.Graph, gpus: list[str], edges: list) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, link ids): the directed links of the path between every GPU pair (src-major),
    pair p's links being link_ids[offsets[p]:offsets[p + 1]].

    Paths minimise latency + time per MB. scipy's Dijkstra runs in C from every GPU at once and
    the paths are walked back through the predecessor table for all pairs together, a hop per
    step: a few seconds for 1000+ GPUs where a Python loop over pairs takes minutes.
    """
    nodes = {name: i for i, name in enumerate(g.nodes)}
    u = np.array([nodes[a] for a, _, _ in edges])
    v = np.array([nodes[b] for _, b, _ in edges])
    cost = np.array([d["latency_us"] + 1e3 / d["bw_GBps"] for *_, d in edges])
    size = len(nodes)
    graph = csr_matrix((np.concatenate([cost, cost]), (np.concatenate([u, v]), np.concatenate([v, u]))),
                       shape=(size, size))
    # Directed link k: edge k // 2, from u to v when even. Keyed by from * size + to for lookup.
    keys = np.concatenate([u * size + v, v * size + u])
    ids = np.concatenate([2 * np.arange(len(edges)), 2 * np.arange(len(edges)) + 1])
    order = np.argsort(keys)
    keys, ids = keys[order], ids[order]
    sources = np.array([nodes[gpu] for gpu in gpus])
    _, pred = dijkstra(graph, directed=True, indices=sources, return_predecessors=True)  # (n, nodes)
    n = len(gpus)
    row = np.repeat(np.arange(n), n)  # pair p = src * n + dst
    cur = np.tile(sources, n)  # walk back from each destination towards its source
    pair_of, link_of = [], []
    active = np.flatnonzero(cur != sources[row])
    while active.size:
        prev = pred[row[active], cur[active]]
        link_of.append(ids[np.searchsorted(keys, prev * size + cur[active])])
        pair_of.append(active)
        cur[active] = prev
        active = active[prev != sources[row[active]]]
    pairs = np.concatenate(pair_of) if pair_of else np.zeros(0, dtype=np.int64)
    links = np.concatenate(link_of) if link_of else np.zeros(0, dtype=np.int64)
    by_pair = np.argsort(pairs, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(pairs, minlength=n * n))])
    return offsets.astype(np.int64), links[by_pair].astype(np.int64)


def _moving(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Only messages that cross a link: a rank's data for itself stays in memory."""
    keep = (src != dst) & (nbytes > 0)
    return src[keep], dst[keep], nbytes[keep].astype(float)


def all_to_all(routes: Routes, groups: np.ndarray, send: np.ndarray, algorithm: str) -> Transfer:
    """Concurrent all-to-alls in every group. groups: (G, P) ranks; send: (P, P) bytes i -> j."""
    if algorithm == "flat":
        return _flat(routes, groups, send)
    if algorithm == "hierarchical":
        return _hierarchical(routes, groups, send)
    raise ValueError(f"unknown all-to-all algorithm {algorithm!r}")


def _messages(groups: np.ndarray, send: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, bytes) of every message of every group, as global ranks."""
    p = groups.shape[1]
    i, j = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    return groups[:, i.ravel()].ravel(), groups[:, j.ravel()].ravel(), np.tile(send.ravel(), groups.shape[0])


def _flat(routes: Routes, groups: np.ndarray, send: np.ndarray) -> Transfer:
    return routes.transfer(*_messages(groups, send))


def hierarchical_applies(routes: Routes, groups: np.ndarray) -> bool:
    """2D all-to-all needs every group to span >1 host with the same number of ranks on each."""
    for group in groups:
        counts = np.bincount(routes.gpu_host[group])
        counts = counts[counts > 0]
        if len(counts) < 2 or counts.min() != counts.max():
            return False
    return True


def _hierarchical(routes: Routes, groups: np.ndarray, send: np.ndarray) -> Transfer:
    """DeepSpeed-MoE / Tutel 2D: exchange inside each host, then between hosts in aggregate.

    Member (host h, slot a) first sends to (h, b) everything bound for slot b on any host; then
    (h, b) sends to (h', b) all of host h's data bound for (h', b): fewer, larger messages across
    the network.
    """
    assert hierarchical_applies(routes, groups), "hierarchical all-to-all needs regular host groups"
    p = groups.shape[1]
    host = routes.gpu_host[groups[0]]
    hosts = np.unique(host)
    per_host = p // len(hosts)
    # slot of each member within its host, and host position, for group member index m
    order = np.argsort(host, kind="stable")
    slot = np.empty(p, dtype=int)
    hpos = np.empty(p, dtype=int)
    slot[order] = np.tile(np.arange(per_host), len(hosts))
    hpos[order] = np.repeat(np.arange(len(hosts)), per_host)
    member = np.zeros((len(hosts), per_host), dtype=int)
    member[hpos, slot] = np.arange(p)
    via = member[hpos[:, None], slot[None, :]]  # (p, p): sender's host, receiver's slot
    sender = np.arange(p)[:, None].repeat(p, 1)
    receiver = np.arange(p)[None, :].repeat(p, 0)
    phase1 = np.bincount((sender * p + via).ravel(), weights=send.ravel(), minlength=p * p).reshape(p, p)
    phase2 = np.bincount((via * p + receiver).ravel(), weights=send.ravel(), minlength=p * p).reshape(p, p)
    t = _flat(routes, groups, phase1) + _flat(routes, groups, phase2)
    # Report the physical bound of the exchange itself, as for flat. The two phases never beat it:
    # every byte leaves its sender in one phase or the other, and phase 2 carries all bytes that
    # cross hosts, so time >= the sum of the phase bounds >= this bound.
    return Transfer(t.time_us, routes.bound(*_messages(groups, send)), t.busiest_link)


def ring_all_reduce(routes: Routes, groups: np.ndarray, nbytes: float) -> Transfer:
    """Ring all-reduce of nbytes in every group at once: 2(n-1) steps of nbytes/n to a neighbour."""
    n = groups.shape[1]
    if n == 1 or nbytes <= 0:
        return NO_TRANSFER
    src = groups.ravel()
    dst = np.roll(groups, -1, axis=1).ravel()
    step = routes.transfer(src, dst, np.full(src.shape, nbytes / n))
    return step.scaled(2 * (n - 1))


# ------------------------------------------------------------------------------ compute, memory

# Model FLOPs utilisation assumed for compute estimates: large dense GEMMs reach ~50% of peak in
# practice (Megatron-LM reports 40-55% MFU at scale); expert GEMMs are smaller, hence a flag.
DEFAULT_EFFICIENCY = 0.5
# Training state per parameter, by optimizer.
OPTIMIZER_BYTES_PER_PARAM = {
    # Mixed-precision Adam: 16-bit weight and gradient, fp32 master weight and two fp32 moments
    # (ZeRO, Rajbhandari et al. 2020, Section 3.1). Pure fp32: 4 + 4 + 8 = 16 too.
    "adam": 16,
    # Adafactor as Switch Transformers trained (Shazeer & Stern 2018; T5 sets beta1 = 0): no first
    # moment and a factored second moment of O(rows + cols), so 16-bit weight and gradient plus the
    # fp32 master weight remain.
    "adafactor": 8,
}
# Activations kept per transformer layer without recomputation: 34 * tokens * d_model bytes in
# 16-bit (Korthikanti et al. 2022, Section 4.1; the attention-score term is left out).
ACTIVATION_BYTES_PER_TOKEN_DIM = 34
# Headroom left on each GPU for the framework, fragmentation and communication buffers.
MEMORY_USABLE_FRACTION = 0.9


def compute_us(flops: float, peak_tflops: float, efficiency: float) -> float:
    """Time of `flops` on a device of `peak_tflops` running at `efficiency` of peak."""
    return flops / (peak_tflops * 1e12 * efficiency) * 1e6


# Peak memory of planning, measured on the 2-core development machine (/usr/bin/time's maximum RSS):
# Routes holds every GPU pair's path, about 400 bytes a pair with a DGX host's hops (dgx-a100 x 512
# nodes, 4096 GPUs: 6.8 GB), plus Dijkstra's distance and predecessor rows (12 bytes a graph node per
# GPU); the search keeps about 200 bytes per expert of each Switch layer (t5-tiny with 10^6 experts
# per layer: 0.6 GB over the base).
ROUTE_BYTES_PER_PAIR = 400
DIJKSTRA_BYTES_PER_NODE = 12
PLAN_BYTES_PER_EXPERT = 200


def routes_bytes(gpus: int, graph_nodes: int) -> int:
    """About the memory Routes takes for `gpus` GPUs in a graph of `graph_nodes` nodes."""
    return gpus * gpus * ROUTE_BYTES_PER_PAIR + gpus * graph_nodes * DIJKSTRA_BYTES_PER_NODE


def experts_bytes(experts: int) -> int:
    """About the memory the search takes for `experts` experts, summed over the Switch layers."""
    return experts * PLAN_BYTES_PER_EXPERT
