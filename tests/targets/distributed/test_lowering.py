from moeify.layers.switch import expert_counts

"""Single-process checks of the lowering pass, the default plan and load_rank on a one-rank group."""
import copy

import pytest
import torch
import torch.distributed as dist
from dist_helpers import converted_t5
from tiny import t5_batch

import moeify
from moeify.distributed import (
    ExpertGroup,
    ExpertParallelFFN,
    load_rank,
    lower_expert_parallel,
)
from moeify.layers.collector import router_losses
from moeify.targets.distributed.export import (
    default_plan,
    export_distributed,
)
from moeify.targets.distributed.lower import check_plan_fits


def plan_for(model, world=1, **kw):
    return default_plan(expert_counts(model), world, **kw)


def test_one_rank_lowering_computes_the_same_function():
    model = converted_t5()
    part = lower_expert_parallel(copy.deepcopy(model), plan_for(model), ExpertGroup(0, 1))
    lowered = [m for m in part.modules() if isinstance(m, ExpertParallelFFN)]
    assert len(lowered) == 4 and all(m.expert_ids == [0, 1, 2, 3] for m in lowered)
    batch = {**t5_batch(batch=3), "labels": t5_batch(batch=3)["decoder_input_ids"]}
    for train in (False, True):  # eval and train capacity factors
        model.train(train), part.train(train)
        grads = []
        for m in (model, part):
            m.zero_grad()
            with router_losses(m) as losses:
                out = m(**batch)
            (out.loss + losses.total()).backward()
            grads.append({n: p.grad for n, p in m.named_parameters()})
            assert sum(r.dropped for r in losses.layers) > 0  # capacity bites
        torch.testing.assert_close(part(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_rank_holds_only_its_experts_in_id_order():
    model = converted_t5()
    plan = plan_for(model, 2)
    for layer in plan.layers:
        layer.placement = [1, 0, 1, 0]  # out of order: rank 1 holds experts 0 and 2
    part = lower_expert_parallel(copy.deepcopy(model), plan, ExpertGroup(1, 2))
    name = plan.layers[0].name
    full, local = model.get_submodule(name), part.get_submodule(name)
    assert local.expert_ids == [0, 2] and local.router is not full.router  # a copy: the model is untouched
    assert torch.equal(local.experts.w_in, full.experts.w_in[[0, 2]])
    assert torch.equal(local.experts.w_out, full.experts.w_out[[0, 2]])
    assert torch.equal(local.router.weight, full.router.weight)  # the router is dense: every rank has it


@pytest.mark.parametrize("replicas, held", [
    ({}, [[0, 1], [2, 3]]),  # the default plan: experts 0, 1 on rank 0 and 2, 3 on rank 1
    ({"3": [1, 0]}, [[0, 1, 3], [2, 3]]),  # expert 3 replicated onto rank 0 as well
])
def test_each_rank_holds_copies_of_its_experts_rows(replicas, held):
    model = converted_t5()
    plan = plan_for(model, 2)
    for layer in plan.layers:
        layer.replicas = dict(replicas)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    switch = {layer.name: model.get_submodule(layer.name) for layer in plan.layers}
    for rank in (0, 1):
        part = lower_expert_parallel(copy.deepcopy(model), plan, ExpertGroup(rank, 2))
        lowered = {n: m for n, m in part.named_modules() if isinstance(m, ExpertParallelFFN)}
        assert sorted(lowered) == sorted(switch) and len(lowered) == 4  # exactly the Switch layers
        for name, local in lowered.items():
            full = switch[name].experts
            assert local.expert_ids == held[rank]
            assert local.experts.num_experts == len(held[rank])
            assert local.experts.w_in.shape == (len(held[rank]), 32, 16)  # (local experts, d_ff, d_model)
            assert local.experts.w_out.shape == (len(held[rank]), 16, 32)
            for i, e in enumerate(held[rank]):  # row i is a copy of expert held[rank][i]
                assert torch.equal(local.experts.w_in[i], full.w_in[e])
                assert torch.equal(local.experts.w_out[i], full.w_out[e])
            assert local.experts.w_in.data_ptr() != full.w_in.data_ptr()
            assert torch.equal(local.router.weight, switch[name].router.weight)
        dense = {n: p for n, p in part.state_dict().items() if ".experts." not in n}
        assert dense.keys() == {n for n in before if ".experts." not in n}
        for n, p in dense.items():  # everything but the experts is the source's, on every rank
            assert torch.equal(p, before[n]), n
    for n, p in model.state_dict().items():  # the source model is untouched
        assert torch.equal(p, before[n]), n


def test_structure_only_parts_refuse_to_run():
    model = converted_t5()
    part = lower_expert_parallel(copy.deepcopy(model), plan_for(model, 2), ExpertGroup(0, 2))
    with pytest.raises(RuntimeError, match="built for structure only"):
        part(**t5_batch())


def test_a_group_of_the_wrong_size_is_refused():
    model = converted_t5()
    with pytest.raises(moeify.MoeifyError, match="the expert-parallel group has 1 ranks, the plan 2"):
        lower_expert_parallel(model, plan_for(model, 2), ExpertGroup(0, 1))


def test_plans_for_another_model_are_refused():
    model = converted_t5()
    plan = plan_for(model, 2)
    plan.layers[0].name = "encoder.block.0.layer.1.DenseReluDense"
    with pytest.raises(moeify.MoeifyError, match=r"the plan was made for another model: it lacks "
                                                 r"\['encoder.block.1.layer.1.DenseReluDense'\]"):
        check_plan_fits(model, plan)
    plan = plan_for(converted_t5(num_experts=8), 2)
    with pytest.raises(moeify.MoeifyError, match="has 4 experts, the plan 8"):
        check_plan_fits(model, plan)


@pytest.mark.parametrize("world, experts, kw, ep, placement", [
    (4, 4, {}, 4, [0, 1, 2, 3]),
    (6, 4, {}, 2, [0, 0, 1, 1]),  # the largest divisor of 6 that divides 4
    (3, 4, {"allow_uneven": True}, 3, [0, 0, 1, 2]),
    (4, 8, {"expert_parallel": 2}, 2, [0] * 4 + [1] * 4),
])
def test_default_plans(world, experts, kw, ep, placement):
    plan = default_plan({"layer": experts}, world, **kw)
    assert plan.mesh.shape == [world // ep, ep] and plan.layers[0].placement == placement
    assert plan.expert_parallel_groups == [list(range(d * ep, (d + 1) * ep)) for d in range(world // ep)]
    assert plan.model["estimated"] is False and plan.estimate.step_ms == 0
    plan.check()


def test_default_plan_errors():
    with pytest.raises(moeify.MoeifyError, match="3 ranks cannot hold \\[4\\] experts evenly: pass --allow-uneven"):
        default_plan({"layer": 4}, 3, expert_parallel=3)
    with pytest.raises(moeify.MoeifyError, match="--world-size must be a positive integer, got 0"):
        default_plan({"layer": 4}, 0)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_load_rank_on_one_rank_restores_ties_and_outputs(tmp_path, one_rank_group):
    source = tmp_path / "src"
    model = converted_t5()
    moeify.save(model, source)
    part = load_rank(export_distributed(source, tmp_path / "d1", world_size=1).path).model
    assert part.lm_head.weight is part.shared.weight  # T5 v1.0 ties them; they stay one parameter
    assert not any(t.is_meta for t in part.state_dict().values())
    model.eval(), part.eval()
    torch.testing.assert_close(part(**t5_batch()).logits, model(**t5_batch()).logits, rtol=1e-5, atol=1e-6)


def test_load_rank_fills_buffers_no_checkpoint_holds(tmp_path, one_rank_group):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=2, every=1, offset=0)).eval()
    moeify.save(model, tmp_path / "src")
    part = load_rank(export_distributed(tmp_path / "src", tmp_path / "d1", world_size=1).path).model.eval()
    torch.testing.assert_close(part.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(part(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_load_rank_errors(tmp_path, dist2):
    with pytest.raises(moeify.MoeifyError, match="load_rank needs an initialised process group"):
        load_rank(dist2)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(moeify.MoeifyError, match="was exported for 2 ranks but 1 are running: launch with "
                                                     "--nproc 2"):
            load_rank(dist2)
    finally:
        dist.destroy_process_group()
