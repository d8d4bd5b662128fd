"""Parse `nvidia-smi topo -m` output into one host's topology graph.

The matrix says how each pair of devices connects, not the wiring, so the wiring is inferred:
- NV#: # bonded NVLinks between the two GPUs.
- PIX / PXB: both devices sit behind one PCIe switch (a chain of bridges is modelled as one switch).
- PHB / NODE: same NUMA node, through the CPU's host bridge(s).
- SYS: different NUMA nodes, across the socket interconnect.
Devices that share a switch or a NUMA node are grouped with union-find over those relations.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import networkx as nx

from moeify.errors import MoeifyError
from moeify.planner.hardware import (
    DEFAULT_GPU,
    GPUS,
    add_device,
    add_gpu,
    add_link,
    connect_sockets,
)

CODES = "X, NV#, PIX, PXB, PHB, NODE or SYS"
_SAME_SWITCH = {"PIX", "PXB"}
_SAME_NUMA = _SAME_SWITCH | {"PHB", "NODE"}
_NV = re.compile(r"NV(\d+)$")
_GPU = re.compile(r"GPU(\d+)$")


@dataclass
class Matrix:
    """The parsed table: device names, link codes, affinity columns per GPU, NIC legend."""

    devices: list[str]
    codes: dict[tuple[str, str], str]
    affinity: dict[str, dict[str, str]] = field(default_factory=dict)
    nic_names: dict[str, str] = field(default_factory=dict)  # NIC0 -> mlx5_0


def read_matrix(text: str, source: str = "topology") -> Matrix:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.split()[:1] == ["GPU0"] and line[:1].isspace()), None)
    if start is None:
        raise MoeifyError(f"{source} is not `nvidia-smi topo -m` output: no header line starting with GPU0")
    # Header cells are separated by tabs or runs of spaces; "CPU Affinity" keeps its single space.
    header = [c for c in re.split(r"\t+| {2,}", lines[start].strip()) if c]
    devices = []
    for cell in header:
        if cell.endswith(("Affinity", "NUMA ID")):
            break
        devices.append(cell)
    extra = header[len(devices):]
    codes, affinity, seen = {}, {}, []
    for line in lines[start + 1:]:
        cells = line.split()
        if not cells or cells[0] not in devices:
            break
        name, row = cells[0], cells[1:1 + len(devices)]
        if len(row) < len(devices):
            raise MoeifyError(f"{source}: row {name} has {len(row)} link codes for {len(devices)} devices")
        for other, code in zip(devices, row):
            if not (code in _SAME_NUMA | {"X", "SYS"} or _NV.match(code)):
                raise MoeifyError(f"{source}: unknown link code {code!r} between {name} and {other}: "
                                  f"expected {CODES}")
            codes[name, other] = code
        if _GPU.match(name):
            affinity[name] = dict(zip(extra, cells[1 + len(devices):]))
        seen.append(name)
    missing = [d for d in devices if d not in seen]
    if missing:
        raise MoeifyError(f"{source}: no row for {', '.join(missing)}: pass the whole `nvidia-smi topo -m` output")
    legend = dict(re.findall(r"^\s*(NIC\d+):\s*(\S+)", text, flags=re.M))
    return Matrix(devices, codes, affinity, legend)


def _groups(devices: list[str], codes: dict, related: set[str]) -> list[list[str]]:
    """Connected components of the `related` link codes, in device order."""
    g = nx.Graph()
    g.add_nodes_from(devices)
    g.add_edges_from((a, b) for (a, b), code in codes.items() if a != b and code in related)
    return sorted((sorted(c, key=devices.index) for c in nx.connected_components(g)),
                  key=lambda c: devices.index(c[0]))


def _numa_of(group: list[str], affinity: dict[str, dict[str, str]], fallback: int) -> int:
    """The NUMA node a group's GPUs name, when one names a single node; else the group's index."""
    for dev in group:
        cols = affinity.get(dev, {})
        for key in ("NUMA Affinity", "GPU NUMA ID"):
            if cols.get(key, "").isdigit():
                return int(cols[key])
    return fallback


def parse_nvidia_smi(text: str, *, host: str = "node0", device: str = DEFAULT_GPU,
                     source: str = "topology") -> nx.Graph:
    """One host graph from `nvidia-smi topo -m` text. The matrix names neither the GPU model nor
    the link generations, so `device` says what the GPUs are, and its server generation's NVLink,
    PCIe and InfiniBand are assumed."""
    if device not in GPUS:
        raise MoeifyError(f"unknown GPU model {device!r}: choose one of {', '.join(GPUS)}")
    nvlink, pcie, nic = GPUS[device].nvlink, GPUS[device].pcie, GPUS[device].nic
    m = read_matrix(text, source)
    gpus = [d for d in m.devices if _GPU.match(d)]
    nics = [d for d in m.devices if not _GPU.match(d)]
    numa = {}
    for i, group in enumerate(_groups(m.devices, m.codes, _SAME_NUMA)):
        for dev in group:
            numa[dev] = _numa_of(group, m.affinity, i)
    g = nx.Graph()
    node = {}
    for d in gpus:
        node[d] = add_gpu(g, host, int(_GPU.match(d).group(1)), device, numa[d])
    for i, d in enumerate(nics):
        node[d] = add_device(g, host, "nic", i, numa[d], port=nic, label=m.nic_names.get(d, d))
    cpus = {n: add_device(g, host, "cpu", n, numa=n) for n in sorted(set(numa.values()))}
    connect_sockets(g, list(cpus.values()))
    switches = [grp for grp in _groups(m.devices, m.codes, _SAME_SWITCH) if len(grp) > 1]
    behind_switch = set()
    for k, group in enumerate(switches):
        sw = add_device(g, host, "pcie", k, numa[group[0]])
        add_link(g, sw, cpus[numa[group[0]]], pcie)
        for dev in group:
            add_link(g, node[dev], sw, pcie)
            behind_switch.add(dev)
    for dev in m.devices:
        if dev not in behind_switch:
            add_link(g, node[dev], cpus[numa[dev]], pcie)  # PHB: straight to the host bridge
    for (a, b), code in m.codes.items():
        nv = _NV.match(code)
        if nv and m.devices.index(a) < m.devices.index(b):
            add_link(g, node[a], node[b], nvlink, int(nv.group(1)))
    return g
