import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeify.planner.cost import (
    Routes,
    all_to_all,
    hierarchical_applies,
    ring_all_reduce,
)
from moeify.planner.topology import Topology


def gpu(g, name, host, i):
    g.add_node(name, kind="gpu", host=host, local_index=i, numa=0, device="test", memory_GB=80.0, peak_TFLOPs=100.0)


def link(g, u, v, bw, lat=1.0, kind="pcie4"):
    g.add_edge(u, v, bw_GBps=bw, latency_us=lat, link=kind)


def star(n=4, bw=10.0, overhead=0.0):
    g = nx.Graph(message_overhead_us=overhead)
    g.add_node("node0/nvswitch", kind="nvswitch", host="node0", local_index=-1, numa=-1)
    for i in range(n):
        gpu(g, f"node0/gpu{i}", "node0", i)
        link(g, f"node0/gpu{i}", "node0/nvswitch", bw, 1.0, "nvlink3")
    return Topology(g, "star")


def two_hosts(per_host=2, nvlink=100.0, nic=10.0, overhead=0.0):
    g = nx.Graph(message_overhead_us=overhead)
    g.add_node("ib-switch", kind="switch", host="", local_index=-1, numa=-1)
    for h in range(2):
        host = f"node{h}"
        g.add_node(f"{host}/nvswitch", kind="nvswitch", host=host, local_index=-1, numa=-1)
        g.add_node(f"{host}/nic0", kind="nic", host=host, local_index=0, numa=0)
        link(g, f"{host}/nic0", "ib-switch", nic, 2.0, "ib-hdr")
        for i in range(per_host):
            gpu(g, f"{host}/gpu{i}", host, i)
            link(g, f"{host}/gpu{i}", f"{host}/nvswitch", nvlink, 1.0, "nvlink3")
            link(g, f"{host}/gpu{i}", f"{host}/nic0", 25.0, 1.0, "pcie4")
    return Topology(g, "two-hosts")


def test_point_to_point_is_alpha_plus_bytes_over_bandwidth():
    routes = Routes(star(2, bw=10.0, overhead=3.0))
    t = routes.transfer(np.array([0]), np.array([1]), np.array([1e6]))
    assert t.time_us == pytest.approx(1e6 / 10e3 + 2 * 1.0 + 3.0)  # two hops of 1 us, one message
    assert t.bound_us == pytest.approx(100.0)
    assert t.busiest_link in {("node0/gpu0", "node0/nvswitch"), ("node0/nvswitch", "node0/gpu1")}


def test_flat_all_to_all_on_a_star():
    routes = Routes(star(4, bw=10.0, overhead=0.5))
    groups = np.array([[0, 1, 2, 3]])
    send = np.full((4, 4), 1e6)
    t = all_to_all(routes, groups, send, "flat")
    assert t.time_us == pytest.approx(3e6 / 10e3 + 2.0 + 3 * 0.5)  # 3 peers through one link each way
    assert t.bound_us == pytest.approx(300.0)


def test_full_duplex_links_carry_both_directions_at_once():
    routes = Routes(star(2, bw=10.0))
    both = routes.transfer(np.array([0, 1]), np.array([1, 0]), np.array([1e6, 1e6]))
    one = routes.transfer(np.array([0]), np.array([1]), np.array([1e6]))
    assert both.time_us == pytest.approx(one.time_us)


def test_routes_take_nvlink_over_pcie():
    topo = two_hosts()
    routes = Routes(topo)
    t = routes.transfer(np.array([0]), np.array([1]), np.array([1e7]))
    assert "nvswitch" in "".join(t.busiest_link)
    assert t.time_us == pytest.approx(1e7 / 100e3 + 2.0)


def test_cross_host_bound_is_the_nic():
    routes = Routes(two_hosts(nic=10.0))
    groups = np.array([[0, 1, 2, 3]])
    send = np.full((4, 4), 1e6)
    t = all_to_all(routes, groups, send, "flat")
    # each host sends 2 ranks x 2 remote peers x 1 MB = 4 MB through a 10 GB/s NIC link
    assert t.bound_us == pytest.approx(4e6 / 10e3)
    assert t.time_us >= t.bound_us


def test_hierarchical_sends_fewer_larger_messages_across_hosts():
    topo = two_hosts(per_host=4, overhead=20.0)
    routes = Routes(topo)
    groups = np.arange(8)[None, :]
    assert hierarchical_applies(routes, groups)
    small = np.full((8, 8), 1e3)
    flat = all_to_all(routes, groups, small, "flat")
    hier = all_to_all(routes, groups, small, "hierarchical")
    assert hier.time_us < flat.time_us  # latency-bound: 2 x 4 messages beat 7
    assert hier.time_us >= hier.bound_us and flat.time_us >= flat.bound_us
    # the bytes that cross hosts are the same either way
    assert hier.bound_us == pytest.approx(flat.bound_us)


def test_hierarchical_needs_regular_groups_over_several_hosts():
    routes = Routes(two_hosts(per_host=2))
    assert not hierarchical_applies(routes, np.array([[0, 1]]))  # one host
    assert not hierarchical_applies(routes, np.array([[0, 1, 2]]))  # 2 + 1 members
    assert hierarchical_applies(routes, np.array([[0, 2], [1, 3]]))


def test_ring_all_reduce():
    routes = Routes(star(4, bw=10.0))
    t = ring_all_reduce(routes, np.array([[0, 1, 2, 3]]), 4e6)
    assert t.time_us == pytest.approx(2 * 3 * (1e6 / 10e3 + 2.0))
    assert ring_all_reduce(routes, np.array([[0]]), 4e6).time_us == 0.0


@st.composite
def random_case(draw):
    hosts = draw(st.integers(1, 3))
    per_host = draw(st.integers(1, 3))
    g = nx.Graph(message_overhead_us=draw(st.floats(0, 5)))
    g.add_node("ib-switch", kind="switch", host="", local_index=-1, numa=-1)
    bw = st.floats(0.5, 500)
    for h in range(hosts):
        host = f"node{h}"
        g.add_node(f"{host}/nic0", kind="nic", host=host, local_index=0, numa=0)
        link(g, f"{host}/nic0", "ib-switch", draw(bw), draw(st.floats(0, 5)))
        for i in range(per_host):
            gpu(g, f"{host}/gpu{i}", host, i)
            link(g, f"{host}/gpu{i}", f"{host}/nic0", draw(bw), draw(st.floats(0, 5)))
            if i and draw(st.booleans()):
                link(g, f"{host}/gpu{i}", f"{host}/gpu{i - 1}", draw(bw), draw(st.floats(0, 5)), "nvlink3")
    topo = Topology(g, "random")
    world = hosts * per_host
    send = np.array(draw(st.lists(st.floats(0, 1e7), min_size=world * world, max_size=world * world)))
    return topo, send.reshape(world, world)


@settings(max_examples=40, deadline=None)
@given(random_case())
def test_every_estimate_is_at_least_its_lower_bound(case):
    topo, send = case
    routes = Routes(topo)
    groups = np.arange(len(topo.gpus))[None, :]
    for algorithm in ("flat", "hierarchical"):
        if algorithm == "hierarchical" and not hierarchical_applies(routes, groups):
            continue
        t = all_to_all(routes, groups, send, algorithm)
        assert t.time_us >= t.bound_us * (1 - 1e-9)
    r = ring_all_reduce(routes, groups, float(send.sum()))
    assert r.time_us >= r.bound_us * (1 - 1e-9)


@pytest.mark.parametrize("spec,nodes", [("dgx-h100", 3), ("hgx-a100-4", 2), ("pcie-gen4-8", 2)])
def test_routes_are_shortest_paths(spec, nodes):
    from moeify.planner.topology import load_topology

    topo = load_topology(spec, nodes)
    routes, g = Routes(topo), topo.graph

    def weight(u, v, d):
        return d["latency_us"] + 1e3 / d["bw_GBps"]

    per_link = np.array([weight(u, v, d) for u, v, d in g.edges(data=True) for _ in (0, 1)])
    length = np.bincount(np.repeat(np.arange(routes.n ** 2), np.diff(routes.offsets)),
                         weights=per_link[routes.link_ids], minlength=routes.n ** 2)
    expected = [nx.dijkstra_path_length(g, a, b, weight=weight) for a in topo.gpus for b in topo.gpus]
    np.testing.assert_allclose(length, expected)
    # each pair's directed links chain from its source to its destination
    for i, j in [(0, 1), (0, routes.n - 1), (routes.n - 1, 2)]:
        pair = i * routes.n + j
        step = dict(routes.link_names[k] for k in routes.link_ids[routes.offsets[pair]:routes.offsets[pair + 1]])
        node, hops = topo.gpus[i], 0
        while node != topo.gpus[j]:
            node, hops = step[node], hops + 1
        assert hops == len(step)
