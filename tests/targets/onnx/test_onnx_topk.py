"""Top-k, normalised gates and dropless routing in ONNX: both lowerings and both routes against PyTorch."""
import json
import re
from collections import Counter

import clitools
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from onnxtools import run
from tiny import tiny_net, tiny_t5
from torch import nn

import moeify
from moeify import cli
from moeify.config import RoutingConfig, expert_capacity
from moeify.layers import SwitchFFN
from moeify.targets.onnx import OnnxOptions, export_onnx
from moeify.targets.onnx.verify import dropless

# One portable Switch layer (ReLU, no biases) after constant folding. Top-1 is pinned in
# test_onnx_portable.py; top-2 trades ArgMax for TopK and adds the choice-major reshapes, the
# token of each assignment (Tile), the assignment count and ids, and the sum over a token's choices.
TOP2_OPS = {"Add": 4, "Concat": 1, "CumSum": 1, "Div": 1, "Expand": 1, "Gather": 2, "GatherElements": 1,
            "Gemm": 1, "Less": 1, "MatMul": 2, "Max": 1, "Mul": 5, "OneHot": 1, "Range": 2, "ReduceSum": 1,
            "Relu": 1, "Reshape": 7, "ScatterND": 1, "Shape": 2, "Slice": 1, "Softmax": 1, "Squeeze": 4, "Sub": 2,
            "Tile": 1, "TopK": 1, "Transpose": 2, "Unsqueeze": 1, "Where": 3}
# Dropless: the capacity is the busiest expert's count (ReduceSum, ReduceMax); no keep mask, no spill rows.
TOP2_DROPLESS_OPS = {"Add": 1, "Concat": 1, "CumSum": 1, "Expand": 1, "Gather": 2, "GatherElements": 1, "Gemm": 1,
                     "MatMul": 2, "Mul": 3, "OneHot": 1, "Range": 1, "ReduceMax": 1, "ReduceSum": 2, "Relu": 1,
                     "Reshape": 7, "ScatterND": 1, "Shape": 2, "Softmax": 1, "Squeeze": 3, "Sub": 1, "Tile": 1,
                     "TopK": 1, "Transpose": 2}


def switch_layer(top_k=2, normalize=False, is_dropless=False, factor=1.0, num_experts=4, d=16) -> SwitchFFN:
    torch.manual_seed(0)
    layer = SwitchFFN(d, 32, RoutingConfig(num_experts=num_experts, top_k=top_k, normalize_gates=normalize,
                                           dropless=is_dropless, eval_capacity_factor=factor, min_capacity=1),
                      nn.ReLU())
    g = torch.Generator().manual_seed(0)
    layer.router.reset_parameters(1.0, g)
    layer.experts.reset_parameters(1.0, g)
    return layer.eval()


def export_layer(layer, path, mode="portable") -> onnx.ModelProto:
    export_onnx(layer, path, OnnxOptions(mode=mode), example_inputs=(torch.randn(2, 7, 16),))
    model = onnx.load(str(path / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    return model


def pytorch(model, x, fused_layers=()):
    """PyTorch eval on x (the named layers made dropless, as the fused kernel is) and its routing record."""
    with torch.no_grad(), dropless(model, set(fused_layers)), moeify.router_losses(model) as losses:
        return model(x).numpy(), list(losses.layers)


def ops(model) -> dict:
    return dict(Counter(n.op_type for n in model.graph.node))


def moe_attrs(model) -> list[dict]:
    return [{a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in model.graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]


# --- what com.microsoft.MoE computes for k > 1 (onnxruntime's CPU kernel) -----------------------------

def kernel(x, logits, w1, w2, k, normalize) -> np.ndarray:
    """One com.microsoft.MoE node (ReLU experts, no biases) run on the CPU provider."""
    (t, d), e = x.shape, logits.shape[1]
    node = helper.make_node("MoE", ["x", "r", "w1", "", "w2"], ["y"], domain="com.microsoft", k=k,
                            activation_type="relu", normalize_routing_weights=int(normalize))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [t, d]), ("r", [t, e]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [t, d])],
        [onnx.numpy_helper.from_array(w.numpy(), n) for n, w in (("w1", w1), ("w2", w2))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy(), "r": logits.numpy()})[0]


def weights(e=6, d=8, f=16, t=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(t, d, generator=g), torch.randn(e, f, d, generator=g), torch.randn(e, d, f, generator=g)


def mixture(x, w1, w2, experts, gates) -> np.ndarray:
    """sum_j gates[t, j] * relu-FFN_{experts[t, j]}(x[t]), token by token."""
    return torch.stack([sum(gates[t, j] * (w2[experts[t, j]] @ F.relu(w1[experts[t, j]] @ x[t]))
                            for j in range(experts.shape[1])) for t in range(x.shape[0])]).numpy()


@pytest.mark.parametrize("normalize", [False, True])
def test_kernel_is_softmax_over_all_experts_then_top_k_then_optional_renormalisation(normalize):
    x, w1, w2 = weights()
    logits = 2 * torch.randn(x.shape[0], w1.shape[0], generator=torch.Generator().manual_seed(1))
    gate, expert = logits.softmax(-1).topk(2, dim=-1)  # what Router computes
    if normalize:
        gate = gate / gate.sum(-1, keepdim=True)
    np.testing.assert_allclose(kernel(x, logits, w1, w2, 2, normalize), mixture(x, w1, w2, expert, gate),
                               atol=1e-4, rtol=1e-5)
    # Not a softmax over the k largest logits only: without renormalisation that differs.
    if not normalize:
        top, idx = logits.topk(2, dim=-1)
        assert np.abs(kernel(x, logits, w1, w2, 2, False) - mixture(x, w1, w2, idx, top.softmax(-1))).max() > 0.1


def test_kernel_breaks_exact_ties_toward_the_higher_expert():
    """The one documented difference from PyTorch: torch.max takes the first of tied maxima."""
    x, w1, w2 = weights()
    logits = torch.zeros(x.shape[0], 6)
    logits[:, [1, 2, 4]] = 1.0  # three experts tie for the largest probability
    p = logits.softmax(-1)
    assert p.max(-1).indices.unique().tolist() == [1]  # PyTorch's top-1
    for k, chosen in ((1, [4]), (2, [2, 4])):
        expert = torch.tensor([chosen] * x.shape[0])
        np.testing.assert_allclose(kernel(x, logits, w1, w2, k, False), mixture(x, w1, w2, expert, p.gather(1, expert)),
                                   atol=1e-4, rtol=1e-5)


# --- whole models: both modes, k = 2, gates as they are and renormalised --------------------------------

@pytest.mark.parametrize("mode", ["portable", "fused"])
@pytest.mark.parametrize("normalize", [False, True])
def test_top2_custom_mlp_matches_pytorch(tmp_path, mode, normalize):
    config = moeify.MoEConfig(num_experts=4, top_k=2, normalize_gates=normalize, every=1,
                              eval_capacity_factor=0.75, min_capacity=1)
    sparse = moeify.convert(tiny_net(), config).eval()
    report = export_onnx(sparse, tmp_path / "o", OnnxOptions(mode=mode), example_inputs=(torch.randn(2, 5, 8),))
    assert [p.lowering for p in report.layers] == [mode] * 4 and report.graphs[0].max_abs_diff < 1e-5
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    if mode == "fused":
        assert moe_attrs(model) == [{"k": 2, "activation_type": b"gelu",
                                     "normalize_routing_weights": int(normalize)}] * 4
    else:
        assert ops(model)["TopK"] == 4 and "ArgMax" not in ops(model) and {n.domain for n in model.graph.node} == {""}
    x = torch.randn(3, 9, 8, generator=torch.Generator().manual_seed(2))  # 27 tokens, not the traced 10
    expected, routed = pytorch(sparse, x, [p.spec.name for p in report.layers] if mode == "fused" else [])
    # Portable keeps the eval capacity (ceil(0.75 * 2 * 27 / 4) = 11 slots, and assignments drop);
    # the fused kernel is dropless, so PyTorch is run dropless against it.
    dropped = sum(r.dropped for r in routed)
    assert dropped > 0 if mode == "portable" else dropped == 0 and all(r.capacity is None for r in routed)
    np.testing.assert_allclose(run(tmp_path / "o" / "model.onnx", {"x": x}), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["portable", "fused"])
def test_top2_t5_encoder_and_decoder_match_pytorch(tmp_path, mode):
    sparse = moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4, top_k=2, normalize_gates=True,
                                                              eval_capacity_factor=0.5, min_capacity=1)).eval()
    report = export_onnx(sparse, tmp_path / "o", OnnxOptions(mode=mode))
    assert [p.lowering for p in report.layers] == [mode] * 4
    # The export's own check: another shape than the trace's, the fused layers against dropless PyTorch.
    assert all(g.max_abs_diff < 1e-4 for g in report.graphs)
    assert [g.moe_nodes for g in report.graphs] == ([2, 2] if mode == "fused" else [0, 0])


# --- portable: capacity, choice-major slots, drops and dropless ------------------------------------------

@pytest.mark.parametrize("normalize, is_dropless, expected_ops", [
    (False, False, TOP2_OPS),
    (True, False, {**TOP2_OPS, "Div": 2, "ReduceSum": 2}),  # gate / sum of the k gates
    (False, True, TOP2_DROPLESS_OPS),
])
def test_top2_layer_is_exactly_these_ops(tmp_path, normalize, is_dropless, expected_ops):
    model = export_layer(switch_layer(normalize=normalize, is_dropless=is_dropless), tmp_path / "o")
    assert ops(model) == expected_ops


def test_first_choices_win_the_slots_before_any_second_choice(tmp_path):
    """Even tokens pick (expert 0, then 1), odd tokens (1, then 0): experts 0 and 1 each get 4 first
    choices and 4 second choices for 4 slots. Choice-major order fills them with the first choices, so
    every token keeps exactly its first expert; token-major order would give tokens 0-3 both experts and
    tokens 4-7 none."""
    layer = switch_layer(factor=1.0)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, :2] = torch.tensor([10.0, 1.0])
        layer.router.weight[1, :2] = torch.tensor([9.0, 1.0])
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    sign = torch.tensor([1.0, -1.0] * 4).reshape(2, 4)
    x[..., 0], x[..., 1] = sign * (1 + torch.rand(2, 4, generator=torch.Generator().manual_seed(1))), 30.0
    export_layer(layer, tmp_path / "o")
    expected, (routed,) = pytorch(layer, x)
    assert routed.capacity == expert_capacity(8, 4, 1.0, 1, top_k=2) == 4
    assert routed.tokens_per_expert.tolist() == [8, 8, 0, 0] and routed.dropped == 8
    got = run(tmp_path / "o" / "model.onnx", {"hidden_states": x}).reshape(8, 16)
    np.testing.assert_allclose(got, expected.reshape(8, 16), atol=1e-5, rtol=0)
    # The reference by hand: each token's first expert times its probability, nothing from the second.
    with torch.no_grad():
        x2 = x.reshape(8, 16)
        p = layer.router(x2).probs
        first = torch.tensor([0, 1] * 4)
        e = layer.experts
        by_hand = torch.stack([p[t, first[t]] * (e.w_out[first[t]] @ F.relu(e.w_in[first[t]] @ x2[t]))
                               for t in range(8)])
    np.testing.assert_allclose(got, by_hand.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_top2_drops_exactly_like_pytorch_at_every_shape(tmp_path, normalize):
    layer = switch_layer(normalize=normalize, factor=0.5)
    export_layer(layer, tmp_path / "o")
    dropped = empty = 0
    for batch, seq in [(1, 1), (2, 7), (3, 13), (8, 40)]:  # the graph was traced at (2, 7)
        x = torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(batch * seq))
        expected, (routed,) = pytorch(layer, x)
        got = run(tmp_path / "o" / "model.onnx", {"hidden_states": x})
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        zero = (expected == 0).all(-1)  # tokens whose every choice was dropped
        assert ((got == 0).all(-1) == zero).all(), "tokens with no kept choice must give exactly 0, the same tokens"
        dropped, empty = dropped + routed.dropped, empty + int(zero.sum())
    assert dropped > 0 and empty > 0, "the test must drop single choices and whole tokens"


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_keeps_every_assignment_where_a_capacity_would_drop(tmp_path, top_k):
    layer = switch_layer(top_k=top_k, is_dropless=True, factor=1.0)
    with torch.no_grad():  # most tokens crowd onto expert 2
        layer.router.weight[2, 0] = 8.0
    export_layer(layer, tmp_path / "o")
    for batch, seq in [(1, 1), (3, 13), (8, 40)]:
        x = torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(batch * seq))
        x[..., 0] = x[..., 0].abs()
        expected, (routed,) = pytorch(layer, x)
        assert routed.capacity is None and routed.dropped == 0
        np.testing.assert_allclose(run(tmp_path / "o" / "model.onnx", {"hidden_states": x}), expected,
                                   atol=1e-5, rtol=0)
    # At the last shape a capacity factor of 1.0 would have dropped: dropless really keeps more.
    assert routed.tokens_per_expert.max() > expert_capacity(320, 4, 1.0, 1, top_k)
    assert (expected != 0).any(-1).all()


# --- the dynamo route runs the same lowering ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["portable", "fused"])
def test_dynamo_route_lowers_top2_the_same_way(tmp_path, mode):
    pytest.importorskip("onnxscript")
    layer = switch_layer(normalize=True, factor=0.5)
    report = export_onnx(layer, tmp_path / "o", OnnxOptions(mode=mode, dynamo=True),
                         example_inputs=(torch.randn(2, 7, 16),))
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert (moe_attrs(model)[0]["k"] == 2 if mode == "fused" else ops(model)["TopK"] == 1)
    assert report.graphs[0].max_abs_diff < 1e-5
    x = torch.randn(3, 13, 16, generator=torch.Generator().manual_seed(3))
    expected, (routed,) = pytorch(layer, x, [""] if mode == "fused" else [])
    assert routed.dropped > 0 if mode == "portable" else routed.dropped == 0
    np.testing.assert_allclose(run(tmp_path / "o" / "model.onnx", {"hidden_states": x}), expected, atol=1e-5, rtol=0)


# --- what the CLI says ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, routing, summary, row", [
    ("fused", dict(top_k=2, normalize_gates=True),
     "4 Switch layers fused into com.microsoft.MoE (top-2 norm, dropless: every token is kept), 0 portable",
     "fused +relu +2 of 4 +norm, dropless"),
    ("portable", dict(top_k=2, dropless=True),
     "4 Switch layers lowered to standard ONNX ops (top-2, dropless)", "portable +relu +2 of 4 +dropless"),
    ("portable", dict(top_k=2),
     "4 Switch layers lowered to standard ONNX ops (top-2, exact eval capacity)",
     r"portable +relu +2 of 4 +2\.0 \(min 4\)"),
])
def test_export_summary_and_inspect_show_k_and_dropless(tmp_path, monkeypatch, mode, routing, summary, row):
    moeify.save(moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4, **routing)), tmp_path / "switch")
    result = clitools.run("export", tmp_path / "switch", "--target", "onnx", "--mode", mode, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert summary in " ".join(result.stdout.split())
    graph = tmp_path / "out" / "decoder_model.onnx"
    shown = clitools.run("inspect", graph)
    assert shown.exit_code == 0, shown.output
    assert re.search(rf"^decoder\.block\.3\.layer\.2\.DenseReluDense +{row}\s*$", shown.stdout,
                     flags=re.MULTILINE), shown.stdout
    nodes = [line for line in shown.stdout.splitlines() if line.startswith("MoE node ")]
    assert [line.split(": ")[1].split(",")[0] for line in nodes] == (["k=2 normalised"] * 2 if mode == "fused" else [])
    data = json.loads(clitools.run("inspect", graph, "--json").stdout)
    assert {(r["top_k"], r["normalize_gates"], r["dropless"]) for r in data["switch_layers"]} == {
        (2, routing.get("normalize_gates", False), routing.get("dropless", False))}

    monkeypatch.setattr(cli.console, "width", 80)  # a standard terminal: nothing cut
    for args in (("export", tmp_path / "switch", "--target", "onnx", "--mode", mode, "-o", tmp_path / "again"),
                 ("inspect", graph)):
        result = clitools.run(*args)
        assert result.exit_code == 0, result.output
        clitools.assert_fits(result.stdout)
