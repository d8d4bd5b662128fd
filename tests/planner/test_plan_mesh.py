"""The plan keeps one [dp, ep] rank grid; groups, shape and world size are derived from it."""
import json

import pytest

from moeify.errors import MoeifyError
from moeify.planner.plan import VERSION, Estimate, LayerPlan, Mesh, ShardingPlan, check_grid
from moeify.planner.search import mesh_ranks
from moeify.targets.distributed.export import default_plan


def layout_plan(world: int, ep: int, layout: str) -> ShardingPlan:
    """What the planner builds for a layout (search.py: Mesh(ranks=mesh_ranks(...).tolist()))."""
    return ShardingPlan(mesh=Mesh(ranks=mesh_ranks(world, ep, layout).tolist()), layout=layout,
                        layers=[LayerPlan(name="l0", num_experts=ep, placement=list(range(ep)), all_to_all="flat")],
                        estimate=Estimate(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0))


def hand_plan(ranks) -> ShardingPlan:
    return ShardingPlan(mesh=Mesh(ranks=ranks), layout="contiguous",
                        layers=[LayerPlan(name="l0", num_experts=4, placement=[0, 0, 1, 1], all_to_all="flat")],
                        estimate=Estimate(0.0, 0.0, 0.0, 0.0, 0.0, 0, 0))


@pytest.mark.parametrize("world, ep, layout, grid, data_parallel", [
    (4, 2, "contiguous", [[0, 1], [2, 3]], [[0, 2], [1, 3]]),
    (4, 2, "strided", [[0, 2], [1, 3]], [[0, 1], [2, 3]]),
    (8, 4, "contiguous", [[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]]),
    (8, 4, "strided", [[0, 2, 4, 6], [1, 3, 5, 7]], [[0, 1], [2, 3], [4, 5], [6, 7]]),
    (8, 8, "contiguous", [list(range(8))], [[r] for r in range(8)]),
    (6, 2, "strided", [[0, 3], [1, 4], [2, 5]], [[0, 1, 2], [3, 4, 5]]),
])
def test_groups_are_the_rows_and_columns_of_the_grid(world, ep, layout, grid, data_parallel):
    plan = layout_plan(world, ep, layout)
    assert plan.mesh.ranks == grid
    assert plan.expert_parallel_groups == grid  # rows
    assert plan.data_parallel_groups == data_parallel  # columns
    assert plan.mesh.shape == [len(grid), ep] and plan.mesh.dim_names == ["dp", "ep"]
    assert plan.world_size == len(grid) * ep and plan.expert_parallel_size == ep


def test_default_plans_are_contiguous():
    plan = default_plan({"l0": 4, "l1": 8}, 8, expert_parallel=4)
    assert plan.mesh.ranks == plan.expert_parallel_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan.data_parallel_groups == [[0, 4], [1, 5], [2, 6], [3, 7]] and plan.world_size == 8


def test_the_file_keeps_the_derived_fields_and_round_trips(tmp_path):
    plan = layout_plan(8, 4, "strided")
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["version"] == VERSION
    assert data["mesh"] == {"shape": [2, 4], "dim_names": ["dp", "ep"], "ranks": [[0, 2, 4, 6], [1, 3, 5, 7]]}
    assert data["world_size"] == 8
    assert data["expert_parallel_groups"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert data["data_parallel_groups"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    loaded = ShardingPlan.load(tmp_path / "p.json")
    assert loaded == plan and loaded.to_dict() == data | {"schema": "moeify.plan"}
    assert list(data)[:7] == ["schema", "version", "world_size", "mesh", "layout", "expert_parallel_groups",
                              "data_parallel_groups"]  # the order readers of version 1 saw


def test_a_file_without_the_derived_fields_still_loads():
    data = hand_plan([[0, 1], [2, 3]]).to_dict()
    for key in ("world_size", "expert_parallel_groups", "data_parallel_groups"):
        del data[key]
    del data["mesh"]["shape"], data["mesh"]["dim_names"]
    assert ShardingPlan.from_dict(data).data_parallel_groups == [[0, 2], [1, 3]]


def test_assigning_groups_sets_the_one_grid():
    plan = hand_plan([[0, 1], [2, 3]])
    plan.expert_parallel_groups = [[0, 2], [1, 3]]
    assert plan.mesh.ranks == [[0, 2], [1, 3]] and plan.data_parallel_groups == [[0, 1], [2, 3]]
    plan.data_parallel_groups = [[0, 2], [1, 3]]  # columns: back to contiguous
    assert plan.mesh.ranks == [[0, 1], [2, 3]] and plan.expert_parallel_groups == [[0, 1], [2, 3]]


def refused(data: dict) -> str:
    with pytest.raises(MoeifyError) as err:
        ShardingPlan.from_dict(data)
    message = str(err.value)
    assert "\n" not in message and message.endswith("re-run `moeify plan`")
    return message


@pytest.mark.parametrize("ranks, message", [
    ([[0, 1], [1, 3]], "mesh ranks do not cover every rank exactly once (ranks 0 to 3)"),  # rank 1 twice
    ([[0, 1, 2], [3]], "mesh ranks are ragged (rows of 1 and 3 ranks)"),
    ([[0, 1], [2]], "mesh ranks are ragged (rows of 1 and 2 ranks)"),
    ([[0, 1], [2, 4]], "mesh ranks do not cover every rank exactly once"),  # a gap
    ([], "mesh ranks are not a [dp, ep] grid of integer ranks"),
    ([[0, 1], []], "mesh ranks are not a [dp, ep] grid of integer ranks"),
    ([[0, "1"]], "mesh ranks are not a [dp, ep] grid of integer ranks"),
    (7, "mesh ranks are not a [dp, ep] grid of integer ranks"),
])
def test_a_malformed_grid_is_refused_in_one_line(ranks, message):
    data = hand_plan([[0, 1], [2, 3]]).to_dict()
    data["mesh"]["ranks"] = ranks
    assert message in refused(data)
    with pytest.raises(MoeifyError, match="re-run `moeify plan`"):
        hand_plan(ranks).check()  # the same check on a plan built in Python


@pytest.mark.parametrize("version", [0, VERSION + 1, None, "1"])
def test_other_plan_versions_are_refused(version):
    data = hand_plan([[0, 1], [2, 3]]).to_dict()
    data["version"] = version
    assert refused(data) == f"plan version {version} is not {VERSION}: re-run `moeify plan`"


@pytest.mark.parametrize("key, value, message", [
    ("data_parallel_groups", [[0, 1], [2, 3]], "data_parallel_groups contradicts its mesh ranks"),
    ("expert_parallel_groups", [[1, 0], [2, 3]], "expert_parallel_groups contradicts its mesh ranks"),
    ("expert_parallel_groups", [[0, 1, 2], [3]], "expert_parallel_groups are ragged"),
    ("data_parallel_groups", [[0, 2], [2, 3]], "data_parallel_groups do not cover every rank exactly once"),
    ("world_size", 8, "world_size contradicts its mesh ranks"),
])
def test_derived_fields_that_contradict_the_grid_are_refused(key, value, message):
    data = hand_plan([[0, 1], [2, 3]]).to_dict()
    data[key] = value
    assert message in refused(data)


def test_mesh_shape_in_the_file_must_match_the_grid():
    data = hand_plan([[0, 1], [2, 3]]).to_dict()
    data["mesh"]["shape"] = [1, 4]
    assert "mesh shape contradicts" in refused(data)


def test_check_grid_against_a_world_size():
    check_grid([[0, 2], [1, 3]], 4)
    with pytest.raises(MoeifyError, match="do not cover every rank exactly once"):
        check_grid([[0, 1], [2, 3]], 8)
