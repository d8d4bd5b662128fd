"""The router is float32 whatever the model does: autocast, .to(bf16), .half(), optimiser steps."""
import pytest
import torch
from tiny import t5_batch, tiny_t5

import moeify
from moeify.layers.router import Router
from moeify.layers.switch import expert_counts


def paper_router(d_model=64, experts=8, seed=0):
    r = Router(d_model, experts)
    r.reset_parameters(0.1, torch.Generator().manual_seed(seed))  # the paper's init scale
    return r


def test_autocast_does_not_reach_the_router():
    r = paper_router()
    x = torch.randn(8192, 64)
    reference = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = r(x)
    assert routed.logits.dtype == routed.probs.dtype == routed.gate.dtype == torch.float32
    assert torch.equal(routed.logits, reference.logits)
    assert torch.equal(routed.expert_index, reference.expert_index)  # not one choice differs


def test_autocast_would_change_choices_without_the_guard():
    # The measurement behind the guard: a bf16 linear at the paper's init flips some choices.
    r = paper_router()
    x = torch.randn(8192, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = torch.nn.functional.linear(x, r.weight)
    assert bf16.dtype == torch.bfloat16
    assert (bf16.float().argmax(-1) != r(x).expert_index[:, 0]).sum() > 0


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.bfloat16(), lambda m: m.half(),
                                  lambda m: m.to("cpu", torch.float16), lambda m: m.to(dtype=torch.bfloat16)])
def test_the_router_weight_keeps_its_dtype_and_bits_through_casts(cast):
    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4))
    before = {n: m.router.weight.detach().clone() for n, m in sparse.named_modules() if isinstance(m, moeify.SwitchFFN)}
    cast(sparse)
    for name, m in sparse.named_modules():
        if isinstance(m, moeify.SwitchFFN):
            assert m.router.weight.dtype == torch.float32
            assert torch.equal(m.router.weight, before[name])
            assert m.experts.w_in.dtype != torch.float32  # the rest of the model did change


def test_a_bf16_model_trains_its_router_in_float32():
    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, every=1)).to(torch.bfloat16).train()
    layer = sparse.get_submodule("encoder.block.0.layer.1.DenseReluDense")
    opt = torch.optim.SGD(sparse.parameters(), lr=1e-3)
    before = layer.router.weight.detach().clone()
    batch = t5_batch()
    with moeify.router_losses(sparse) as losses:
        out = sparse(input_ids=batch["input_ids"], labels=batch["decoder_input_ids"])
    (out.loss + losses.total()).backward()
    grad = layer.router.weight.grad
    assert grad.dtype == torch.float32
    opt.step()
    expected = before.add(grad, alpha=-1e-3)  # SGD's update, in float32
    assert layer.router.weight.dtype == torch.float32 and torch.equal(layer.router.weight, expected)
    assert not torch.equal(expected.to(torch.bfloat16).float(), expected)  # a bf16 weight would round it


def test_gradients_keep_the_router_dtype_through_a_cast():
    r = paper_router(8, 4)
    r(torch.randn(3, 8)).logits.sum().backward()
    grad = r.weight.grad.clone()
    r.half()
    assert r.weight.grad.dtype == torch.float32 and torch.equal(r.weight.grad, grad)


def test_the_lowered_layer_keeps_a_float32_router():
    from moeify.planner.plan import ShardingPlan  # noqa: F401  (the plan type the lowering reads)
    from moeify.targets.distributed.export import default_plan
    from moeify.targets.distributed.layer import ExpertGroup
    from moeify.targets.distributed.lower import lower_expert_parallel

    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4))
    layers = expert_counts(sparse)
    part = lower_expert_parallel(sparse, default_plan(layers, 1), ExpertGroup(0, 1)).bfloat16()
    routers = [m.router for m in part.modules() if isinstance(m, moeify.SwitchFFN)]
    assert routers and all(r.weight.dtype == torch.float32 for r in routers)


def test_a_bfloat16_router_routes_in_bfloat16_and_keeps_it_through_casts_and_save(tmp_path):
    # --router-dtype bfloat16 exists to measure what selective precision buys: it must really be bf16.
    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, router_dtype="bfloat16")).eval()
    layer = next(m for m in sparse.modules() if isinstance(m, moeify.SwitchFFN))
    assert layer.router.weight.dtype == torch.bfloat16
    x = torch.randn(5, 16)
    out = layer.router(x)
    assert out.logits.dtype == out.probs.dtype == torch.bfloat16
    assert torch.equal(out.logits, torch.nn.functional.linear(x.bfloat16(), layer.router.weight))
    sparse.float()  # a float32 model keeps its bf16 routers, as a bf16 model keeps float32 ones
    assert layer.router.weight.dtype == torch.bfloat16 and layer.experts.w_in.dtype == torch.float32
    moeify.save(sparse, tmp_path / "out")
    again = moeify.load(tmp_path / "out").eval()
    routers = [m.router.weight for m in again.modules() if isinstance(m, moeify.SwitchFFN)]
    assert routers and all(w.dtype == torch.bfloat16 for w in routers)
    assert torch.equal(again(**t5_batch()).logits, sparse(**t5_batch()).logits)


def test_the_onnx_export_refuses_a_bfloat16_router(tmp_path):
    from moeify.targets.onnx import OnnxOptions, export_onnx

    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=2, router_dtype="bfloat16")).eval()
    with pytest.raises(moeify.MoeifyError, match="routes in bfloat16, which the ONNX export does not write: "
                                                 "convert again with router_dtype='float32'"):
        export_onnx(sparse, tmp_path / "onnx", OnnxOptions())
    assert not (tmp_path / "onnx").exists()
