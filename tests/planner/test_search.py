import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeify.checkpoint.records import SwitchLayerRecord
from moeify.config import RoutingConfig
from moeify.errors import MoeifyError
from moeify.planner.plan import ShardingPlan
from moeify.planner.search import Planner, SearchOptions, mesh_ranks
from moeify.planner.topology import load_topology
from moeify.planner.workload import LayerWork, Workload


def layer_record(name, experts, d_model, d_ff):
    return SwitchLayerRecord(name, d_model, d_ff, gated=False, bias=False, activation="ReLU()",
                             routing=RoutingConfig(num_experts=experts), params_per_expert=2 * d_model * d_ff,
                             experts_held=experts, router_params=experts * d_model)


def workload(experts=128, layers=12, d_model=768, d_ff=3072, tokens=8192, dense=220_000_000, load=None):
    return Workload(
        model="test", layers=tuple(LayerWork(layer_record(f"l{i}", experts, d_model, d_ff), load) for i in range(layers)),
        dense_params=dense, ffn_layers=2 * layers, tokens_per_rank=tokens)


def test_mesh_layouts():
    assert mesh_ranks(8, 4, "contiguous").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert mesh_ranks(8, 4, "strided").tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_switch_base_on_two_dgx_a100():
    plan = Planner(load_topology("dgx-a100", nodes=2), workload()).plan()
    assert plan.world_size == 16
    dp, ep = plan.mesh.shape
    assert dp * ep == 16 and plan.mesh.dim_names == ["dp", "ep"]
    assert sorted(r for g in plan.expert_parallel_groups for r in g) == list(range(16))
    assert np.array(plan.data_parallel_groups).T.tolist() == plan.expert_parallel_groups
    layer = plan.layers[0]
    assert len(layer.placement) == 128 and np.bincount(layer.placement).tolist() == [128 // ep] * ep
    e = plan.estimate
    assert e.all_to_all_ms >= e.lower_bound_ms > 0
    assert e.memory_per_rank_bytes <= e.memory_limit_bytes
    assert e.step_ms == pytest.approx(e.compute_ms + e.all_to_all_ms + e.allreduce_ms)
    chosen = [a for a in plan.alternatives if a["step_ms"] == e.step_ms]
    assert chosen and all(a["step_ms"] >= e.step_ms for a in plan.alternatives if a["fits"])


def test_plan_json_round_trip(tmp_path):
    plan = Planner(load_topology("hgx-a100-4"), workload(experts=8, layers=2)).plan()
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["schema"] == "moeify.plan" and data["version"] == 1
    assert set(data) >= {"world_size", "mesh", "expert_parallel_groups", "data_parallel_groups", "layers", "estimate"}
    assert set(data["estimate"]) >= {"step_ms", "all_to_all_ms", "lower_bound_ms", "memory_per_rank_bytes"}
    assert ShardingPlan.load(tmp_path / "p.json").to_dict() == plan.to_dict()


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(version=99), "plan version 99 is not 1"),
    (lambda d: d.pop("schema"), "not a moeify sharding plan"),
    (lambda d: d.pop("mesh"), "incomplete or malformed"),
    (lambda d: d["expert_parallel_groups"][0].append(0), "do not cover every rank exactly once"),
])
def test_malformed_plans_are_refused(tmp_path, change, message):
    plan = Planner(load_topology("hgx-a100-4"), workload(experts=8, layers=1)).plan()
    data = plan.to_dict()
    change(data)
    with pytest.raises(MoeifyError, match=message):
        ShardingPlan.from_dict(data)


def test_experts_that_do_not_divide_need_uneven_placement():
    topo = load_topology("hgx-a100-4")
    w = workload(experts=6, layers=1)
    with pytest.raises(MoeifyError, match="--expert-parallel 4 is not possible.*--allow-uneven"):
        Planner(topo, w, SearchOptions(expert_parallel=4)).plan()
    plan = Planner(topo, w, SearchOptions(expert_parallel=4, allow_uneven=True)).plan()
    assert plan.layers[0].placement == [0, 0, 1, 1, 2, 3]


def test_a_model_that_does_not_fit_names_how_many_gpus_would():
    big = workload(experts=2048, layers=4, d_model=2080, d_ff=6144, dense=1_000_000_000, tokens=2048)
    with pytest.raises(MoeifyError, match=r"does not fit.*try --nodes (\d+)") as err:
        Planner(load_topology("dgx-h100", nodes=2), big).plan()
    nodes = int(err.value.args[0].rsplit("--nodes ", 1)[1])
    plan = Planner(load_topology("dgx-h100", nodes=nodes), big).plan()  # the suggestion is enough
    assert plan.estimate.memory_per_rank_bytes <= plan.estimate.memory_limit_bytes


def test_calibrated_load_changes_placement_and_replicates_hot_experts():
    loads = tuple([0.3, 0.3] + [0.4 / 14] * 14)
    topo = load_topology("hgx-a100-4")
    w = workload(experts=16, layers=1, load=loads)
    plan = Planner(topo, w, SearchOptions(expert_parallel=4, replicate_hot=2)).plan()
    placement = plan.layers[0].placement
    assert placement[0] != placement[1]  # the two hot experts land on different ranks
    assert set(plan.layers[0].replicas) == {"0", "1"}
    single = Planner(topo, w, SearchOptions(expert_parallel=4)).plan()
    assert single.layers[0].replicas == {}
    assert plan.layers[0].compute_ms < single.layers[0].compute_ms  # copies split the hot experts' tokens


def test_optimizer_sets_the_training_state_per_parameter():
    topo, w = load_topology("hgx-a100-4"), workload(experts=8, layers=2)
    opts = dict(expert_parallel=4, layouts=("contiguous",), algorithms=("flat",))
    adam = Planner(topo, w, SearchOptions(**opts)).plan()
    adafactor = Planner(topo, w, SearchOptions(**opts, optimizer="adafactor")).plan()
    held = w.dense_params + 2 * (8 // 4) * w.layers[0].expert_params  # dense + 2 experts in each of 2 layers
    saved = adam.estimate.memory_per_rank_bytes - adafactor.estimate.memory_per_rank_bytes
    assert saved == held * (16 - 8)
    assert adafactor.model["optimizer"] == "adafactor"


@settings(max_examples=25, deadline=None)
@given(preset=st.sampled_from(["dgx-a100", "hgx-a100-4", "pcie-gen5-8", "localhost-gloo"]), nodes=st.integers(1, 3),
       experts=st.sampled_from([3, 4, 6, 8, 16, 64]), layers=st.integers(1, 3), uneven=st.booleans(),
       hot=st.integers(0, 2), skew=st.floats(0.0, 3.0), tokens=st.sampled_from([256, 4096]))
def test_plan_invariants(preset, nodes, experts, layers, uneven, hot, skew, tokens):
    topo = load_topology(f"localhost-gloo:{nodes + 1}" if preset == "localhost-gloo" else preset, nodes=1
                         if preset == "localhost-gloo" else nodes)
    raw = np.exp(-skew * np.arange(experts))
    w = workload(experts=experts, layers=layers, d_model=64, d_ff=256, dense=1_000_000, tokens=tokens,
                 load=tuple(raw / raw.sum()))
    try:
        plan = Planner(topo, w, SearchOptions(allow_uneven=uneven, replicate_hot=hot)).plan()
    except MoeifyError as e:
        assert "--allow-uneven" in str(e) and not uneven
        return
    world, ep = plan.world_size, plan.expert_parallel_size
    assert world == len(topo.gpus)
    assert sorted(r for g in plan.expert_parallel_groups for r in g) == list(range(world))  # partition
    assert sorted(r for g in plan.data_parallel_groups for r in g) == list(range(world))
    for layer in plan.layers:
        assert len(layer.placement) == experts and all(0 <= r < ep for r in layer.placement)  # once each
        for e, ranks in layer.replicas.items():
            assert layer.placement[int(e)] in ranks and len(set(ranks)) == len(ranks) > 1
        assert len(layer.replicas) <= hot
        assert layer.all_to_all_ms >= layer.lower_bound_ms * (1 - 1e-9)
    e = plan.estimate
    assert e.all_to_all_ms >= e.lower_bound_ms * (1 - 1e-9)
    assert e.memory_per_rank_bytes <= e.memory_limit_bytes


def test_capacity_keeps_min_capacity_as_the_layer_does():
    # 16 tokens, 8 experts, cf 1.25: ceil(2.5) = 3 slots, but min_capacity 6 gives 6, as in SwitchFFN.
    # Half the tokens choose expert 0, so its kept tokens (and the compute of its rank) follow the slots.
    import dataclasses

    loads = tuple([0.5] + [0.5 / 7] * 7)
    topo, opts = load_topology("hgx-a100-4"), SearchOptions(expert_parallel=4, layouts=("contiguous",),
                                                            algorithms=("flat",))
    base = workload(experts=8, layers=1, tokens=16, load=loads)
    low, high = (Planner(topo, dataclasses.replace(base, min_capacity=m), opts).plan() for m in (0, 6))
    assert high.layers[0].compute_ms / low.layers[0].compute_ms > 1.5  # 6 / 3 slots on the busiest expert
