"""Hardware figures (links, GPUs) with their sources, and the built-in host topologies.

Units everywhere: `bw_GBps` is GB/s (1e9 bytes/s) in *each* direction of a full-duplex link,
`latency_us` is the one-way latency of one hop in microseconds, `memory_GB` is 1e9 bytes,
`peak_TFLOPs` is dense 16-bit tensor-core throughput.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import networkx as nx


@dataclass(frozen=True)
class Link:
    bw_GBps: float  # per direction
    latency_us: float


# One NVLink (3rd and 4th generation alike) carries 25 GB/s per direction: A100 has 12 links,
# 600 GB/s bidirectional; H100 SXM has 18, 900 GB/s bidirectional (NVIDIA A100 and H100
# datasheets). NV# in `nvidia-smi topo -m` counts bonded links, so a pair gets # x 25 GB/s.
NVLINK_GBPS_PER_LINK = 25.0
LINKS = {
    "nvlink3": Link(NVLINK_GBPS_PER_LINK, 0.7),
    "nvlink4": Link(NVLINK_GBPS_PER_LINK, 0.7),
    # PCIe x16 line rate: 4.0 is 16 GT/s x 16 lanes x 128/130 = 31.5 GB/s, 5.0 twice that (PCI-SIG).
    "pcie4": Link(31.5, 1.0),
    "pcie5": Link(63.0, 1.0),
    # Socket interconnect: 3 UPI links at 11.2 GT/s, 20.8 GB/s each per direction (Intel Xeon
    # Scalable 3rd gen); AMD's xGMI between EPYC sockets is in the same range.
    "upi": Link(62.4, 0.5),
    # InfiniBand line rates: HDR 200 Gb/s = 25 GB/s, NDR 400 Gb/s = 50 GB/s per port
    # (NVIDIA ConnectX-6 / ConnectX-7); ~1 us per switch hop plus the adapters.
    "ib-hdr": Link(25.0, 1.5),
    "ib-ndr": Link(50.0, 1.5),
}


@dataclass(frozen=True)
class GPU:
    memory_GB: float
    peak_TFLOPs: float  # dense BF16/FP16 tensor core, no sparsity
    nvlink: str  # the links a server built around this GPU has, for `nvidia-smi topo -m` input
    pcie: str
    nic: str


# NVIDIA datasheets.
GPUS = {
    "A100-SXM4-80GB": GPU(80.0, 312.0, "nvlink3", "pcie4", "ib-hdr"),
    "A100-PCIE-80GB": GPU(80.0, 312.0, "nvlink3", "pcie4", "ib-hdr"),
    "H100-SXM5-80GB": GPU(80.0, 989.0, "nvlink4", "pcie5", "ib-ndr"),
    "H100-PCIE-80GB": GPU(80.0, 756.0, "nvlink4", "pcie5", "ib-ndr"),
}
DEFAULT_GPU = "A100-SXM4-80GB"

# gloo all_to_all_single between local processes, fitted by benchmarks/bench_alltoall.py on the
# 2-core development machine: per-hop latency, per-peer message overhead, and the machine's
# aggregate copy bandwidth. Loopback traffic is copied by the CPU cores, so the ranks share that
# bandwidth: each rank's link gets 1/ranks of it. With more ranks than cores the processes
# time-share the cores, which stretches each message's software cost by ranks / cores.
GLOO_LATENCY_US = 33.4
GLOO_MESSAGE_OVERHEAD_US = 241.2
GLOO_BW_GBPS = 5.07
# One process's share of a 2-core machine (~150 GFLOP/s float32 GEMM in all).
GLOO_RANK_TFLOPS = 0.075


def add_device(g: nx.Graph, host: str, kind: str, index: int, numa: int = 0, **attrs) -> str:
    """Add `{host}/{kind}{index}` (e.g. node0/gpu3) and return its name."""
    name = f"{host}/{kind}{index}"
    g.add_node(name, kind=kind, host=host, local_index=index, numa=numa, **attrs)
    return name


def add_gpu(g: nx.Graph, host: str, index: int, device: str, numa: int = 0) -> str:
    spec = GPUS[device]
    return add_device(g, host, "gpu", index, numa, device=device, memory_GB=spec.memory_GB,
                      peak_TFLOPs=spec.peak_TFLOPs)


def add_link(g: nx.Graph, u: str, v: str, link: str, width: float = 1.0) -> None:
    """A full-duplex edge of `width` bonded links of type `link`."""
    spec = LINKS[link]
    g.add_edge(u, v, bw_GBps=spec.bw_GBps * width, latency_us=spec.latency_us, link=link)


def connect_sockets(g: nx.Graph, cpus: list[str]) -> None:
    for i, a in enumerate(cpus):
        for b in cpus[i + 1:]:
            add_link(g, a, b, "upi")


@dataclass(frozen=True)
class HostSpec:
    """One server: GPUs in pairs behind PCIe switches, one or more NICs per switch, 2 sockets."""

    description: str
    device: str
    gpus: int
    pcie: str
    nic: str
    nics_per_switch: int
    gpus_per_switch: int = 2
    nvswitch_links: int = 0  # NVLinks from each GPU into the NVSwitch fabric (0: none)
    nvlink_mesh_links: int = 0  # NVLinks between each GPU pair when there is no NVSwitch
    nvlink: str = "nvlink3"
    sockets: int = 2


def build_host(spec: HostSpec, host: str = "node0") -> nx.Graph:
    g = nx.Graph()
    switches = spec.gpus // spec.gpus_per_switch
    cpus = [add_device(g, host, "cpu", s, numa=s) for s in range(spec.sockets)]
    connect_sockets(g, cpus)
    gpus = []
    for s in range(switches):
        numa = s * spec.sockets // switches
        sw = add_device(g, host, "pcie", s, numa)
        add_link(g, sw, cpus[numa], spec.pcie)
        for i in range(s * spec.gpus_per_switch, (s + 1) * spec.gpus_per_switch):
            gpus.append(add_gpu(g, host, i, spec.device, numa))
            add_link(g, gpus[-1], sw, spec.pcie)
        for i in range(s * spec.nics_per_switch, (s + 1) * spec.nics_per_switch):
            add_link(g, add_device(g, host, "nic", i, numa, port=spec.nic), sw, spec.pcie)
    if spec.nvswitch_links:
        # The NVSwitches of a DGX form one non-blocking fabric: model it as a single node.
        fabric = f"{host}/nvswitch"
        g.add_node(fabric, kind="nvswitch", host=host, local_index=0, numa=-1)
        for gpu in gpus:
            add_link(g, gpu, fabric, spec.nvlink, spec.nvswitch_links)
    for i, a in enumerate(gpus):
        for b in gpus[i + 1:] if spec.nvlink_mesh_links else ():
            add_link(g, a, b, spec.nvlink, spec.nvlink_mesh_links)
    return g


HOSTS = {
    # DGX A100 user guide: 8 A100 on 6 NVSwitches (12 NVLinks each), 8 ConnectX-6 HDR for compute,
    # 4 PCIe 4.0 switches each serving 2 GPUs and 2 NICs, 2 AMD EPYC sockets.
    "dgx-a100": HostSpec("8x A100 SXM4, NVSwitch (NVLink3 300 GB/s), 8x HDR 200 Gb/s",
                         "A100-SXM4-80GB", 8, "pcie4", "ib-hdr", nics_per_switch=2, nvswitch_links=12),
    # DGX H100 user guide: 4 NVSwitch chips (18 NVLink4 per GPU), 8 ConnectX-7 NDR, PCIe 5.0.
    "dgx-h100": HostSpec("8x H100 SXM5, NVSwitch (NVLink4 450 GB/s), 8x NDR 400 Gb/s",
                         "H100-SXM5-80GB", 8, "pcie5", "ib-ndr", nics_per_switch=2, nvswitch_links=18,
                         nvlink="nvlink4"),
    # HGX A100 4-GPU board: every pair joined by 4 NVLinks (NV4), one HDR NIC per GPU.
    "hgx-a100-4": HostSpec("4x A100 SXM4, NVLink3 mesh (4 links per pair), 4x HDR 200 Gb/s",
                           "A100-SXM4-80GB", 4, "pcie4", "ib-hdr", nics_per_switch=1, gpus_per_switch=1,
                           nvlink_mesh_links=4),
    "pcie-gen4-8": HostSpec("8x A100 PCIe, no NVLink, PCIe 4.0 switches, 4x HDR 200 Gb/s",
                            "A100-PCIE-80GB", 8, "pcie4", "ib-hdr", nics_per_switch=1),
    "pcie-gen5-8": HostSpec("8x H100 PCIe, no NVLink, PCIe 5.0 switches, 4x NDR 400 Gb/s",
                            "H100-PCIE-80GB", 8, "pcie5", "ib-ndr", nics_per_switch=1),
}


def _physical_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 16.0


def loopback_host(ranks: int, bw_GBps: float = GLOO_BW_GBPS, latency_us: float = GLOO_LATENCY_US,
                   message_overhead_us: float = GLOO_MESSAGE_OVERHEAD_US) -> nx.Graph:
    """`ranks` CPU processes on this machine, talking gloo over loopback (planned as "GPUs").
    `bw_GBps` is the aggregate bandwidth all ranks share."""
    cores = os.cpu_count() or 1
    g = nx.Graph(message_overhead_us=message_overhead_us * max(1.0, ranks / cores))
    host = "localhost"
    hub = f"{host}/loopback"
    g.add_node(hub, kind="switch", host=host, local_index=0, numa=0)
    memory = _physical_memory_gb() / ranks
    for r in range(ranks):
        rank = add_device(g, host, "gpu", r, device="cpu process (gloo)", memory_GB=memory,
                          peak_TFLOPs=GLOO_RANK_TFLOPS)
        g.add_edge(rank, hub, bw_GBps=bw_GBps / ranks, latency_us=latency_us, link="loopback")
    return g
