"""GPU topology: a networkx graph of GPUs, switches, NICs and CPUs, from a preset or a file.

Nodes: `kind` (gpu, nvswitch, pcie, nic, cpu, switch), `host`, `local_index`, `numa`; GPUs also
`device`, `memory_GB`, `peak_TFLOPs`. Edges: `bw_GBps` per direction, `latency_us`, `link`.
Graph attribute `message_overhead_us`: software cost per message of a collective.
Hosts are joined by InfiniBand through one non-blocking switch ("ib-switch"), i.e. a full
bisection fat tree, which is how DGX SuperPODs are built.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from xml.etree.ElementTree import ParseError

import networkx as nx

from moeify.checkpoint.files import read_json, write_text_atomically
from moeify.checkpoint.schemas import validate
from moeify.errors import MoeifyError
from moeify.planner.hardware import (
    DEFAULT_GPU,
    HOSTS,
    add_link,
    build_host,
    loopback_host,
)
from moeify.planner.nvidia_smi import parse_nvidia_smi

GLOO_PRESET = "localhost-gloo"
TOPOLOGY_PRESETS = {**{name: spec.description for name, spec in HOSTS.items()},
           GLOO_PRESET: "CPU processes on this machine over gloo (localhost-gloo:N for N ranks, default 2)"}
IB_SWITCH = "ib-switch"


def _natural(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


class Topology:
    """A validated topology graph; `gpus` lists the GPUs in rank order (host by host)."""

    def __init__(self, graph: nx.Graph, name: str) -> None:
        self.graph, self.name = graph, name
        gpus = sorted((n for n, d in graph.nodes(data=True) if d.get("kind") == "gpu"), key=_natural)
        for i, n in enumerate(gpus):  # files may leave these out; rank order needs them
            graph.nodes[n].setdefault("host", "node0")
            graph.nodes[n].setdefault("local_index", i)
        self.gpus = sorted(gpus, key=lambda n: (_natural(graph.nodes[n]["host"]), graph.nodes[n]["local_index"], n))
        self.hosts = sorted({graph.nodes[n]["host"] for n in gpus}, key=_natural)

    def gpus_of(self, host: str) -> list[str]:
        return [n for n in self.gpus if self.graph.nodes[n]["host"] == host]

    @property
    def gpus_per_host(self) -> int:
        return max(len(self.gpus_of(h)) for h in self.hosts)

    def validate(self) -> "Topology":
        g, where = self.graph, f"topology {self.name}"
        if not self.gpus:
            raise MoeifyError(f"{where} has no GPUs: give GPU nodes kind='gpu'")
        for n in self.gpus:
            for key in ("memory_GB", "peak_TFLOPs"):
                value = g.nodes[n].get(key)
                if not isinstance(value, (int, float)) or not value > 0:
                    raise MoeifyError(f"{where}: GPU {n} needs a positive {key} (got {value!r})")
        for u, v, d in g.edges(data=True):
            bw, latency = d.get("bw_GBps"), d.get("latency_us", 0.0)
            if not isinstance(bw, (int, float)) or not (bw > 0 and math.isfinite(bw)):
                raise MoeifyError(f"{where}: link {u} - {v} has bw_GBps={bw!r}: every link needs a positive "
                                  "bandwidth in GB/s per direction")
            if not isinstance(latency, (int, float)) or not latency >= 0:
                raise MoeifyError(f"{where}: link {u} - {v} has latency_us={latency!r}: it must be >= 0")
            d.setdefault("latency_us", 0.0)
            d.setdefault("link", "other")
        reach = nx.node_connected_component(g, self.gpus[0])
        cut_off = [n for n in self.gpus if n not in reach]
        if cut_off:
            raise MoeifyError(f"{where}: {cut_off[0]} cannot reach {self.gpus[0]}: every GPU must reach every "
                              "other: add the missing link")
        return self


def replicate(host: nx.Graph, nodes: int) -> nx.Graph:
    """`nodes` copies of a one-host graph, their NICs joined through one InfiniBand switch."""
    hosts = {d["host"] for d in host.nodes.values() if d.get("host")}
    if len(hosts) != 1:
        raise MoeifyError(f"the topology already describes {len(hosts)} hosts: drop --nodes")
    (name,) = hosts
    if nodes == 1:
        return host
    nics = [n for n, d in host.nodes(data=True) if d["kind"] == "nic"]
    if not nics:
        raise MoeifyError("the topology has no NIC to join hosts with: add kind='nic' nodes or use --nodes 1")
    g = nx.Graph(**host.graph)
    g.add_node(IB_SWITCH, kind="switch", host="", local_index=0, numa=-1)
    for h in range(nodes):
        new = f"node{h}"
        copy = nx.relabel_nodes(host, {n: n.replace(f"{name}/", f"{new}/", 1) for n in host})
        for n in copy:
            copy.nodes[n]["host"] = new
        g.update(copy)
        for nic in nics:
            add_link(g, nic.replace(f"{name}/", f"{new}/", 1), IB_SWITCH, host.nodes[nic].get("port", "ib-hdr"))
    return g


def localhost_gloo(ranks: int, **link) -> Topology:
    """`ranks` local CPU processes over gloo; `link` overrides the fitted bw/latency/overhead."""
    return Topology(loopback_host(ranks, **link), f"{GLOO_PRESET}:{ranks}").validate()


def read_topology(path: Path, nodes: int = 1, gpu: str = DEFAULT_GPU) -> Topology:
    """A topology file: `nvidia-smi topo -m` text (.txt; `gpu` names the GPU model, which the
    text does not), node-link JSON (.json) or GraphML."""
    path = Path(path)
    if path.is_dir():
        raise MoeifyError(f"topology {path} is a directory: pass a preset ({', '.join(TOPOLOGY_PRESETS)}) or a "
                          "file (nvidia-smi topo -m text, node-link JSON or GraphML)")
    if not path.is_file():
        raise MoeifyError(f"topology file {path} not found: pass a preset ({', '.join(TOPOLOGY_PRESETS)}) or an existing file")
    try:
        if path.suffix == ".json":
            fix = "write node-link JSON as the README's \"Planning the sharding\" describes"
            data = validate("topology", read_json(path, what="topology", fix=fix, expect=object), path)
            key = "links" if "links" in data else "edges"
            graph = nx.node_link_graph(data, directed=False, multigraph=False, edges=key)
        elif path.suffix == ".graphml":
            graph = nx.Graph(nx.read_graphml(path))
            for key in ("node_default", "edge_default"):  # GraphML bookkeeping, not ours
                graph.graph.pop(key, None)
        else:
            graph = parse_nvidia_smi(path.read_text(errors="replace"), device=gpu, source=str(path))
    except (ParseError, KeyError, TypeError, AttributeError, nx.NetworkXError) as e:
        raise MoeifyError(f"cannot read topology {path}: {type(e).__name__}: {e}; expected node-link JSON "
                          "(nodes + edges or links), GraphML, or `nvidia-smi topo -m` text") from None
    if nodes > 1:
        graph = replicate(graph, nodes)
    name = path.stem if nodes == 1 else f"{nodes} x {path.stem}"
    return Topology(graph, name).validate()


def write_topology(topology: Topology, path: Path) -> None:
    """Node-link JSON (with "edges") or GraphML, by suffix."""
    path = Path(path)
    if path.suffix == ".graphml":
        nx.write_graphml(topology.graph, path)
    else:
        write_text_atomically(path, json.dumps(nx.node_link_data(topology.graph, edges="edges"), indent=1))


def load_topology(spec: str, nodes: int = 1, gpu: str = DEFAULT_GPU) -> Topology:
    """A preset name (`--nodes` copies joined by InfiniBand) or a topology file."""
    if nodes < 1:
        raise MoeifyError(f"--nodes must be at least 1, got {nodes}: pass the number of hosts, or leave it unset "
                          "for one")
    name, _, count = spec.partition(":")
    if name == GLOO_PRESET:
        if nodes != 1:
            raise MoeifyError(f"{GLOO_PRESET} is one machine: give the ranks as {GLOO_PRESET}:{nodes}, not --nodes")
        if count and not (count.isdigit() and int(count) >= 1):
            raise MoeifyError(f"{spec}: the rank count after ':' must be a positive integer")
        return localhost_gloo(int(count or 2))
    if spec in HOSTS:
        graph = replicate(build_host(HOSTS[spec]), nodes)
        return Topology(graph, spec if nodes == 1 else f"{nodes} x {spec}").validate()
    if Path(spec).suffix or "/" in spec or Path(spec).exists():
        return read_topology(Path(spec), nodes, gpu)
    close = difflib.get_close_matches(spec, list(TOPOLOGY_PRESETS), n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise MoeifyError(f"unknown topology preset {spec!r}: {hint}presets: {', '.join(TOPOLOGY_PRESETS)}; "
                      "or pass a .txt (nvidia-smi topo -m), .json or .graphml file")
