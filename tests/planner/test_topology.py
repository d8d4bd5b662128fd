import json
from pathlib import Path

import networkx as nx
import pytest

from moeify.errors import MoeifyError
from moeify.planner.nvidia_smi import parse_nvidia_smi, read_matrix
from moeify.planner.topology import (
    TOPOLOGY_PRESETS,
    load_topology,
    localhost_gloo,
    read_topology,
    write_topology,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "topo"
HGX = (FIXTURES / "hgx-a100-4gpu.txt").read_text()
PCIE = (FIXTURES / "pcie-4gpu-2numa.txt").read_text()


def links(g, kind):
    return sorted(tuple(sorted((u, v))) for u, v, d in g.edges(data=True) if d["link"] == kind)


def path_links(g, a, b):
    path = nx.shortest_path(g, a, b, weight=lambda u, v, d: d["latency_us"] + 1e3 / d["bw_GBps"])
    return [g.edges[u, v]["link"] for u, v in zip(path, path[1:])]


def test_space_separated_sample_with_nic_legend():
    m = read_matrix(HGX)
    assert m.devices == ["GPU0", "GPU1", "GPU2", "GPU3", "NIC0", "NIC1", "NIC2", "NIC3"]
    assert m.nic_names == {"NIC0": "mlx5_0", "NIC1": "mlx5_1", "NIC2": "mlx5_2", "NIC3": "mlx5_3"}
    assert m.affinity["GPU2"] == {"CPU Affinity": "0", "NUMA Affinity": "0-1"}
    assert m.codes["GPU0", "GPU3"] == "NV4" and m.codes["NIC1", "GPU1"] == "PXB"
    g = parse_nvidia_smi(HGX)
    gpus = [f"node0/gpu{i}" for i in range(4)]
    # NV4: four bonded NVLink3 links of 25 GB/s between every pair
    assert links(g, "nvlink3") == [(a, b) for i, a in enumerate(gpus) for b in gpus[i + 1:]]
    assert {g.edges[e]["bw_GBps"] for e in links(g, "nvlink3")} == {100.0}
    # each GPU shares a PCIe switch with its own NIC only (PXB), the rest is SYS
    for i in range(4):
        assert path_links(g, f"node0/gpu{i}", f"node0/nic{i}") == ["pcie4", "pcie4"]
        assert g.nodes[f"node0/nic{i}"]["label"] == f"mlx5_{i}"
    pcie_only = g.subgraph(n for n in g if g.nodes[n]["kind"] != "gpu")
    assert "upi" in path_links(pcie_only, "node0/nic0", "node0/nic1")  # SYS
    assert path_links(g, "node0/gpu0", "node0/gpu1") == ["nvlink3"]


def test_tab_separated_sample_with_mlx5_columns_and_numa():
    m = read_matrix(PCIE)
    assert m.devices == ["GPU0", "GPU1", "GPU2", "GPU3", "mlx5_0"]
    assert m.affinity["GPU3"] == {"CPU Affinity": "16-31,48-63", "NUMA Affinity": "1", "GPU NUMA ID": "N/A"}
    g = parse_nvidia_smi(PCIE, device="H100-PCIE-80GB")
    assert [g.nodes[f"node0/gpu{i}"]["numa"] for i in range(4)] == [0, 0, 1, 1]
    assert g.nodes["node0/nic0"]["numa"] == 0 and g.nodes["node0/nic0"]["label"] == "mlx5_0"
    assert links(g, "nvlink4") == []
    assert path_links(g, "node0/gpu0", "node0/gpu1") == ["pcie5", "pcie5"]  # PIX: one switch
    assert path_links(g, "node0/gpu0", "node0/nic0") == ["pcie5", "pcie5"]
    assert path_links(g, "node0/gpu1", "node0/gpu2") == ["pcie5", "pcie5", "upi", "pcie5", "pcie5"]  # SYS
    assert g.nodes["node0/gpu0"]["peak_TFLOPs"] == 756.0 and g.nodes["node0/nic0"]["port"] == "ib-ndr"


@pytest.mark.parametrize("text,message", [
    (HGX.replace("PXB", "PXQ", 1), "unknown link code 'PXQ' between GPU0 and NIC0"),
    ("hello\nworld\n", "no header line starting with GPU0"),
    ("\n".join(HGX.splitlines()[:3]), "no row for GPU2"),
])
def test_parser_errors_name_the_problem(text, message):
    with pytest.raises(MoeifyError, match=message):
        parse_nvidia_smi(text)


@pytest.mark.parametrize("name,gpus,nvlink_bw,nics", [
    ("dgx-a100", 8, 300.0, 8), ("dgx-h100", 8, 450.0, 8), ("hgx-a100-4", 4, 100.0, 4),
    ("pcie-gen4-8", 8, None, 4), ("pcie-gen5-8", 8, None, 4)])
def test_presets(name, gpus, nvlink_bw, nics):
    t = load_topology(name)
    g = t.graph
    assert len(t.gpus) == gpus and t.hosts == ["node0"]
    assert sum(d["kind"] == "nic" for d in g.nodes.values()) == nics
    nv = {d["bw_GBps"] for *_, d in g.edges(data=True) if d["link"].startswith("nvlink")}
    assert nv == ({nvlink_bw} if nvlink_bw else set())


def test_nodes_replicate_hosts_through_one_ib_switch():
    t = load_topology("dgx-h100", nodes=3)
    assert len(t.gpus) == 24 and t.hosts == ["node0", "node1", "node2"] and t.gpus_per_host == 8
    assert t.gpus[8] == "node1/gpu0" and t.gpus_of("node2")[-1] == "node2/gpu7"
    ib = [(u, v, d) for u, v, d in t.graph.edges(data=True) if "ib-switch" in (u, v)]
    assert len(ib) == 24 and {d["bw_GBps"] for *_, d in ib} == {50.0}
    assert path_links(t.graph, "node0/gpu0", "node2/gpu0") == ["pcie5", "pcie5", "ib-ndr", "ib-ndr", "pcie5", "pcie5"]


def test_a_parsed_host_replicates_too(tmp_path):
    f = tmp_path / "topo.txt"
    f.write_text(PCIE)
    t = load_topology(str(f), nodes=2)
    assert t.name == "2 x topo" and len(t.gpus) == 8 and len(t.hosts) == 2


def test_localhost_gloo_ranks():
    t = load_topology("localhost-gloo:3")
    assert len(t.gpus) == 3 and t.graph.graph["message_overhead_us"] > 0
    # the ranks share the machine's copy bandwidth
    assert localhost_gloo(3, bw_GBps=9.0).graph.edges["localhost/gpu0", "localhost/loopback"]["bw_GBps"] == 3.0


@pytest.mark.parametrize("suffix,edges", [(".json", "edges"), (".json", "links"), (".graphml", None)])
def test_write_then_read_round_trips(tmp_path, suffix, edges):
    t = load_topology("hgx-a100-4", nodes=2)
    path = tmp_path / f"t{suffix}"
    if edges == "links":
        path.write_text(json.dumps(nx.node_link_data(t.graph, edges="links")))
    else:
        write_topology(t, path)
    again = read_topology(path)
    assert again.gpus == t.gpus
    assert nx.utils.graphs_equal(again.graph, t.graph)


@pytest.mark.parametrize("spec,nodes,message", [
    ("dgx-a101", 1, "did you mean dgx-a100"),
    ("dgx-a100", 0, "--nodes must be at least 1"),
    ("localhost-gloo", 2, "localhost-gloo:2"),
    ("missing.json", 1, "topology file missing.json not found"),
])
def test_bad_specs(spec, nodes, message):
    with pytest.raises(MoeifyError, match=message):
        load_topology(spec, nodes)


def test_corrupt_and_invalid_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MoeifyError, match="bad.json is not valid JSON"):
        read_topology(bad)
    g = nx.Graph()
    g.add_node("a/gpu0", kind="gpu", host="a", device="x", memory_GB=80.0, peak_TFLOPs=1.0)
    g.add_node("a/gpu1", kind="gpu", host="a", device="x", memory_GB=-1.0, peak_TFLOPs=1.0)
    g.add_edge("a/gpu0", "a/gpu1", bw_GBps=5.0, latency_us=1.0, link="pcie4")
    bad.write_text(json.dumps(nx.node_link_data(g, edges="edges")))
    with pytest.raises(MoeifyError, match="a/gpu1 needs a positive memory_GB"):
        read_topology(bad)
    nic_less = tmp_path / "one.json"
    g.nodes["a/gpu1"]["memory_GB"] = 80.0
    nic_less.write_text(json.dumps(nx.node_link_data(g, edges="edges")))
    assert len(read_topology(nic_less).gpus) == 2
    with pytest.raises(MoeifyError, match="no NIC to join hosts"):
        read_topology(nic_less, nodes=2)


def test_every_preset_is_listed():
    assert set(TOPOLOGY_PRESETS) == {"dgx-a100", "dgx-h100", "hgx-a100-4", "pcie-gen4-8", "pcie-gen5-8", "localhost-gloo"}
