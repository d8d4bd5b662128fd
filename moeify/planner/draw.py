"""Draw a plan: hosts, GPUs (with their rank and experts), links coloured by type (PNG, SVG or PDF by the suffix)."""
from __future__ import annotations

import os
from pathlib import Path

from moeify.errors import MoeifyError
from moeify.planner.plan import ShardingPlan, expert_ranges
from moeify.planner.topology import Topology

LINK_COLOURS = {"nvlink3": "#2ca02c", "nvlink4": "#2ca02c", "pcie4": "#1f77b4", "pcie5": "#1f77b4",
                "upi": "#7f7f7f", "ib-hdr": "#ff7f0e", "ib-ndr": "#ff7f0e", "loopback": "#9467bd"}
ROW = {"nvswitch": 1.2, "gpu": 0.0, "pcie": -1.0, "nic": -1.8, "cpu": -2.6}
MAX_HOSTS = 8  # beyond this a picture stops being readable: draw the first hosts, say how many more


def experts_by_rank(plan: ShardingPlan, layer: int = 0) -> dict[int, list[int]]:
    """Global rank -> experts of `layer` it holds (home copies and replicas)."""
    spec = plan.layers[layer]
    held: dict[int, list[int]] = {}
    for group in plan.expert_parallel_groups:
        for e, home in enumerate(spec.placement):
            for group_rank in spec.replicas.get(str(e), [home]):
                held.setdefault(group[group_rank], []).append(e)
    return held


def draw_plan(plan: ShardingPlan, topology: Topology, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    g = topology.graph
    hosts = topology.hosts[:MAX_HOSTS]
    per_host = max(len(topology.gpus_of(h)) for h in hosts)
    width = max(per_host, 2) + 1.5
    pos = {}
    for h_index, host in enumerate(hosts):
        members = [n for n, d in g.nodes(data=True) if d.get("host") == host]
        for kind in ROW:
            nodes = sorted((n for n in members if g.nodes[n]["kind"] == kind),
                           key=lambda n: (g.nodes[n].get("local_index", 0), n))
            for i, n in enumerate(nodes):
                spread = per_host / max(len(nodes), 1)
                pos[n] = (h_index * width + (i + 0.5) * spread, ROW[kind])
    for n, d in g.nodes(data=True):
        if n not in pos and not d.get("host"):  # cluster switches sit under the hosts
            pos[n] = (len(hosts) * width / 2 - 0.75, -3.6)
    held = experts_by_rank(plan)
    rank_of = {gpu: r for r, gpu in enumerate(topology.gpus)}
    fig, ax = plt.subplots(figsize=(max(8.0, 1.6 * width * len(hosts)), 6.5))
    for u, v, d in g.edges(data=True):
        if u in pos and v in pos:
            ax.plot(*zip(pos[u], pos[v]), color=LINK_COLOURS.get(d["link"], "#cccccc"), lw=1.2, alpha=0.6, zorder=1)
    for n, (x, y) in pos.items():
        kind = g.nodes[n]["kind"]
        if kind == "gpu":
            r = rank_of[n]
            ax.add_patch(plt.Rectangle((x - 0.42, y - 0.32), 0.84, 0.64, color="#d9ead3", ec="black", zorder=2))
            ax.text(x, y + 0.1, f"r{r}", ha="center", va="center", fontsize=8, weight="bold", zorder=3)
            ax.text(x, y - 0.14, expert_ranges(held.get(r, [])), ha="center", va="center", fontsize=6, zorder=3)
        else:
            ax.scatter([x], [y], s=90, color="white", edgecolors="black", zorder=2)
            ax.text(x, y - 0.3, n.split("/")[-1], ha="center", va="top", fontsize=6, zorder=3)
    for h_index, host in enumerate(hosts):
        ax.text(h_index * width + per_host / 2, 1.9, host, ha="center", fontsize=9, weight="bold")
    more = len(topology.hosts) - len(hosts)
    e = plan.estimate
    ax.set_title(f"{plan.model.get('name', '')}: {plan.mesh.shape[0]} x {plan.mesh.shape[1]} (dp x ep), "
                 f"{plan.layout}, {plan.layers[0].name} shown; step {e.step_ms:.1f} ms, all-to-all "
                 f"{e.all_to_all_ms:.1f} ms (bound {e.lower_bound_ms:.1f})"
                 + (f"; {more} more hosts not drawn" if more > 0 else ""), fontsize=9)
    for label, colour in (("NVLink", "#2ca02c"), ("PCIe", "#1f77b4"), ("InfiniBand", "#ff7f0e"), ("UPI", "#7f7f7f")):
        ax.plot([], [], color=colour, label=label)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_axis_off()
    ax.set_aspect("equal")
    path = Path(path)
    # The temporary keeps the real suffix's format: matplotlib would pick PNG from a ".png" temporary.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        try:
            fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=130, bbox_inches="tight")
            os.replace(tmp, path)
        except OSError as e:
            raise MoeifyError(f"cannot write {path} ({e.strerror}): choose another --draw path") from None
    finally:  # an interrupt (SIGTERM, raised by the CLI) too leaves no temporary
        plt.close(fig)
        tmp.unlink(missing_ok=True)
