"""Top-k and dropless routing across ranks (gloo): outputs, every gradient and one SGD step equal the
single-process model's on each rank's batch (scenarios share one spawn per world size); the run
report names what it counts."""
import io
from pathlib import Path

import pytest
from dist_helpers import check_parity, converted_t5, run_ranks, strided_plan

import moeify
from moeify.targets.distributed.entry import print_report
from moeify.targets.distributed.export import export_distributed
from moeify.targets.distributed.steps import LayerStats, RunReport

# name: (MoEConfig overrides of converted_t5's tight capacity, whether assignments are dropped)
TWO_RANKS = {
    "top2": (dict(top_k=2), True),  # capacity ceil(2T/4) and unbalanced random routers: assignments drop
    # capacity ceil(2 * 2T/4) = T: an expert gets each token at most once, so none can overflow
    "top2-normalized": (dict(top_k=2, normalize_gates=True, capacity_factor=2.0, eval_capacity_factor=2.0), False),
    "top2-dropless": (dict(top_k=2, dropless=True), False),
}
FOUR_RANKS = {
    "top2-normalized": (dict(top_k=2, normalize_gates=True), True),
    "top2-dropless": (dict(top_k=2, dropless=True), False),
}


def sources(scenarios: dict, tmp_path: Path, num_experts: int = 4) -> list[Path]:
    paths = []
    for name, (config, _) in scenarios.items():
        moeify.save(converted_t5(num_experts=num_experts, **config), tmp_path / "src" / name)
        paths.append(tmp_path / "src" / name)
    return paths


def check_routing(ref: dict, config: dict) -> None:
    """The reference (hence the export) really routes as configured: not top-1 by accident."""
    assert {(r.top_k, r.normalize_gates, r.dropless) for r in ref["routing"]} == {
        (2, config.get("normalize_gates", False), config.get("dropless", False))}


@pytest.mark.slow
def test_top2_and_dropless_on_two_ranks_match_the_single_process_model(tmp_path):
    """Ranks' batches differ in size (2 and 3 sequences), so their capacities differ; when dropless,
    each rank's buffers are sized by its own busiest expert, and some layer's differ between ranks."""
    srcs = sources(TWO_RANKS, tmp_path)
    exports = [export_distributed(s, tmp_path / "dist" / s.name, world_size=2).path for s in srcs]
    results = run_ranks(2, exports, tmp_path / "results")
    for src, ranks, (name, (config, drops)) in zip(srcs, results, TWO_RANKS.items()):
        ref = check_parity(src, ranks, drops=drops)
        check_routing(ref, config)
        if config.get("dropless"):
            assert any(a != b for a, b in zip(*ref["busiest"])), "no layer's C differs between the ranks"


@pytest.mark.slow
def test_top2_and_dropless_on_a_dp2_ep2_mesh_match_the_single_process_model(tmp_path):
    """dp=2 x ep=2, strided, 5 experts placed unevenly: top-2 assignments cross uneven all-to-all
    splits, and expert gradients are reduced over the data-parallel group."""
    srcs = sources(FOUR_RANKS, tmp_path, num_experts=5)
    exports = []
    for s in srcs:
        plan = strided_plan(s)
        for layer in plan.layers:
            layer.placement = [1, 0, 1, 0, 0]
        exports.append(export_distributed(s, tmp_path / "dist" / s.name, plan).path)
    results = run_ranks(4, exports, tmp_path / "results")
    for src, ranks, (config, drops) in zip(srcs, results, FOUR_RANKS.values()):
        check_routing(check_parity(src, ranks, drops=drops), config)


@pytest.mark.parametrize("top_k, unit", [(1, "tokens"), (2, "assignments")])
def test_the_run_report_counts_assignments_when_tokens_have_several_experts(top_k, unit):
    """With k > 1 the counts are (token, choice) assignments: the report must not call them tokens."""
    from rich.console import Console

    report = RunReport(world_size=2, steps=1, train=False, tokens=0, seconds=0.0, timed_tokens=0,
                       layers=[LayerStats("ffn", [3, 5], 2, top_k)])
    console = Console(width=80, record=True, file=io.StringIO())
    print_report(report, console)
    words = [w for w in console.export_text().split() if set(w) != {"─"}]  # the title wraps to the table's width
    assert words[words.index("router"):] == ["router", "statistics", "over", "all", "ranks:", "dropped", "25.0%", "of",
                                             unit, "layer", unit, "per", "expert", "dropped", "ffn", "3", "5", "25.0%"]
