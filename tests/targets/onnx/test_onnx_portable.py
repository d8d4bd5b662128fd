"""Portable ONNX: standard ops only, and PyTorch's exact eval capacity semantics in onnxruntime."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxtools import assert_t5_graphs_match, run
from tiny import tiny_net, tiny_t5
from torch import nn

import moeify
from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.targets.onnx import OnnxOptions, export_onnx

PORTABLE = OnnxOptions(mode="portable")
# The Switch layer lowered on its own, after constant folding: nothing else, nothing hidden.
SWITCH_OPS = {"Add": 4, "ArgMax": 1, "Concat": 1, "CumSum": 1, "Div": 1, "Expand": 1,
              "Gather": 2, "GatherElements": 2, "Gemm": 1, "Less": 1, "MatMul": 2, "Max": 1, "Mul": 4,
              "OneHot": 1, "Range": 1, "Relu": 1, "Reshape": 4, "ScatterND": 1, "Shape": 2, "Slice": 1,
              "Softmax": 1, "Squeeze": 3, "Sub": 2, "Unsqueeze": 1, "Where": 3}


def switch_layer(num_experts=4, factor=1.0, min_capacity=1, d=16, seed=0) -> SwitchFFN:
    torch.manual_seed(seed)
    layer = SwitchFFN(d, 32, RoutingConfig(num_experts=num_experts, eval_capacity_factor=factor,
                                           min_capacity=min_capacity), nn.ReLU())
    g = torch.Generator().manual_seed(seed)
    layer.router.reset_parameters(1.0, g)
    layer.experts.reset_parameters(1.0, g)
    return layer.eval()


def assert_standard_and_valid(path):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} == {""}, "portable graphs use the default domain only"
    assert [o.domain or "ai.onnx" for o in model.opset_import] == ["ai.onnx"] and model.opset_import[0].version >= 17
    return model


def test_switch_layer_is_exactly_the_documented_ops(tmp_path):
    export_onnx(switch_layer(), tmp_path / "o", PORTABLE, example_inputs=(torch.randn(2, 7, 16),))
    model = assert_standard_and_valid(tmp_path / "o" / "model.onnx")
    assert dict(Counter(n.op_type for n in model.graph.node)) == SWITCH_OPS


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_eval_capacity_and_drops_match_pytorch_at_every_shape(tmp_path, factor):
    layer = switch_layer(factor=factor)
    export_onnx(layer, tmp_path / "o", PORTABLE, example_inputs=(torch.randn(2, 7, 16),))
    dropped = 0
    for batch, seq in [(1, 1), (2, 7), (3, 13), (8, 40)]:  # the graph was traced at (2, 7)
        x = torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(batch * seq))
        with torch.no_grad():
            expected = layer(x).numpy()
        got = run(tmp_path / "o" / "model.onnx", {"hidden_states": x})
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        zero = (expected == 0).all(-1)
        assert ((got == 0).all(-1) == zero).all(), "dropped tokens must give exactly 0, the same tokens"
        dropped += int(zero.sum())
    assert dropped > 0 or factor == 2.0, "the test must exercise dropping"


@pytest.mark.parametrize("experts, factor, shape, slots", [
    (5, 1.2, (5, 5), 6),  # 1.2 * 25 / 5: 6 exactly (in float32, 1.2f = 1.20000005 would give 7)
    (10, 1.1, (4, 25), 11),  # 1.1 * 100 / 10: 11 exactly (in float64, 11.000000000000002 would give 12)
])
def test_capacity_is_computed_exactly_like_pytorch(tmp_path, experts, factor, shape, slots):
    layer = switch_layer(num_experts=experts, factor=factor, min_capacity=1)
    with torch.no_grad():  # every token picks expert 3
        layer.router.weight.zero_()
        layer.router.weight[3, 0] = 10.0
    x = torch.randn(*shape, 16, generator=torch.Generator().manual_seed(0))
    x[..., 0] = x[..., 0].abs() + 1
    tokens = shape[0] * shape[1]
    assert layer.capacity(tokens) == slots
    export_onnx(layer, tmp_path / "o", PORTABLE, example_inputs=(torch.randn(2, 7, 16),))
    got = run(tmp_path / "o" / "model.onnx", {"hidden_states": x}).reshape(tokens, 16)
    with torch.no_grad():
        expected = layer(x).reshape(tokens, 16).numpy()
    assert (np.abs(got).sum(-1) > 0).tolist() == [True] * slots + [False] * (tokens - slots)  # the first win
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_t5_encoder_and_decoder_match_pytorch(tmp_path, ff):
    sparse = moeify.convert(tiny_t5(ff), moeify.MoEConfig(num_experts=4, eval_capacity_factor=0.75,
                                                          min_capacity=1)).eval()
    report = export_onnx(sparse, tmp_path / "o", PORTABLE)
    assert [g.file for g in report.graphs] == ["encoder_model.onnx", "decoder_model.onnx"]
    assert all(g.max_abs_diff < 1e-4 and g.nodes < g.nodes_exported and g.moe_nodes == 0 for g in report.graphs)
    enc, dec = (assert_standard_and_valid(tmp_path / "o" / f) for f in ("encoder_model.onnx", "decoder_model.onnx"))
    assert [i.name for i in enc.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in enc.graph.output] == ["last_hidden_state"]
    assert [i.name for i in dec.graph.input] == ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    assert [o.name for o in dec.graph.output] == ["logits"]
    assert "Dropout" not in {n.op_type for m in (enc, dec) for n in m.graph.node}

    g = torch.Generator().manual_seed(5)  # a shape the graphs were not traced at, with padding
    ids, dec_ids = torch.randint(2, 64, (3, 9), generator=g), torch.randint(2, 64, (3, 4), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[2, 5:] = 0
    with torch.no_grad():
        out = sparse(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, use_cache=False)
    assert_t5_graphs_match(tmp_path / "o", out, ids, mask, dec_ids)


def test_custom_mlp_module_exports_as_one_model(tmp_path):
    sparse = moeify.convert(tiny_net(), moeify.MoEConfig(num_experts=3, every=1, eval_capacity_factor=1.0,
                                                         min_capacity=1)).eval()
    report = export_onnx(sparse, tmp_path / "o", PORTABLE, example_inputs=(torch.randn(2, 5, 8),))
    assert [g.file for g in report.graphs] == ["model.onnx"] and len(report.layers) == 4
    model = assert_standard_and_valid(tmp_path / "o" / "model.onnx")
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["output"]
    x = torch.randn(4, 9, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = sparse(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "o" / "model.onnx", {"x": x}), expected, atol=1e-4, rtol=0)


def test_dropout_nodes_are_removed_and_their_consumers_rewired():
    from onnx import TensorProto, helper

    from moeify.targets.onnx.optimize import strip_dropout

    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [2])  # noqa: E731
    nodes = [helper.make_node("Dropout", ["x"], ["d1"]), helper.make_node("Dropout", ["d1"], ["d2"]),
             helper.make_node("Relu", ["d2"], ["y"]), helper.make_node("Dropout", ["x"], ["z"])]
    graph = helper.make_graph(nodes, "g", [vi("x")], [vi("y"), vi("z")])
    model = helper.make_model(graph)
    assert strip_dropout(model) == 3
    assert [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node] == [
        ("Relu", ["x"], ["y"]), ("Identity", ["x"], ["z"])]  # a graph output keeps its name
    onnx.checker.check_model(model, full_check=True)
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.array([-1.0, 2.0], np.float32)})
    assert [o.tolist() for o in out] == [[0.0, 2.0], [-1.0, 2.0]]
