"""The contract, with real processes (gloo): each rank's outputs, gradients and one optimiser step
equal the single-process model's on the same batches."""
import json
from pathlib import Path

import pytest
from dist_helpers import check_parity, converted_t5, run_ranks, strided_plan

import moeify
from moeify.layers.switch import expert_counts
from moeify.targets.distributed.export import (
    default_plan,
    export_distributed,
    skeleton,
)

pytestmark = pytest.mark.slow


def parity(source: Path, export: Path, world: int, tmp_path: Path) -> None:
    check_parity(source, run_ranks(world, [export], tmp_path / "results")[0])


def test_two_ranks_match_the_single_process_model(t5_source, dist2, tmp_path):
    parity(t5_source, dist2, 2, tmp_path)


def test_four_ranks_uneven_strided_plan_match_the_single_process_model(tmp_path):
    """dp=2 x ep=2 on a strided mesh; 5 experts placed unevenly and out of order (3 on one rank, 2 on
    the other), so the all-to-all has uneven splits and expert gradients are reduced over dp."""
    source = tmp_path / "src"
    moeify.save(converted_t5(num_experts=5), source)
    plan = strided_plan(source)
    for layer in plan.layers:
        layer.placement = [1, 0, 1, 0, 0]
    export = export_distributed(source, tmp_path / "dist4", plan).path
    manifest = json.loads((export / "manifest.json").read_text())
    assert [len(r["experts"][plan.layers[0].name]) for r in manifest["ranks"]] == [3, 3, 2, 2]
    parity(source, export, 4, tmp_path)


def test_four_ranks_with_replicated_experts_match_the_single_process_model(t5_source, tmp_path):
    """ep=4: copies on 2, 3 and 4 ranks, so senders reach remote copies (expert 0: ranks 1 and 3
    send to rank 2, rank 2 to rank 0) and ranks hold 1 to 3 experts. Every copy must end with the
    reference's gradient and parameters (check_parity compares each rank's rows)."""
    plan = default_plan(expert_counts(skeleton(t5_source)), 4)  # placement [0, 1, 2, 3]
    for layer, replicas in zip(plan.layers, ({"0": [0, 2], "3": [1, 2, 3]}, {"1": [0, 1, 2, 3]}, {"2": [1, 2]}, {})):
        layer.replicas = replicas
    export = export_distributed(t5_source, tmp_path / "dist4", plan).path
    manifest = json.loads((export / "manifest.json").read_text())
    assert [r["experts"][plan.layers[0].name] for r in manifest["ranks"]] == [[0], [1, 3], [0, 2, 3], [3]]
    parity(t5_source, export, 4, tmp_path)


def test_replicas_with_data_parallel_match_the_single_process_model(t5_source, tmp_path):
    """dp=2 x ep=2, strided: a replicated expert's gradient is summed over its copies in the ep group,
    then over dp, like the other experts."""
    plan = strided_plan(t5_source)  # placement [0, 0, 1, 1]
    for layer in plan.layers[::2]:
        layer.replicas = {"1": [0, 1]}
    export = export_distributed(t5_source, tmp_path / "dist4", plan).path
    parity(t5_source, export, 4, tmp_path)
