"""Quantized experts: com.microsoft.QMoE (int8, int4) equals PyTorch with the same dequantized weights."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from clitools import assert_user_error, run
from onnx import TensorProto, helper, numpy_helper
from onnxtools import assert_t5_graphs_match
from tiny import tiny_t5
from torch import nn

import moeify
from moeify.targets.onnx import OnnxOptions, export_onnx
from moeify.targets.onnx.quantize import pack, quantize, unpack
from moeify.targets.onnx.verify import dequantized, dropless

BITS = {"int8": 8, "int4": 4}


def qmoe_nodes(path) -> tuple[list[onnx.NodeProto], dict[str, onnx.TensorProto]]:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.op_type == "QMoE" and n.domain == "com.microsoft"]
    return nodes, {t.name: t for t in model.graph.initializer}


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_packing_is_symmetric_per_channel_and_low_nibble_first():
    assert pack(np.array([[1, 2, 15, 0]], np.uint8), 4).tolist() == [[0x21, 0x0F]]
    w = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(0))
    w[1, 2] = 0  # an all-zero channel: scale 0, codes at the zero point
    for bits in (8, 4):
        q = quantize(w, bits)
        top, zero = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
        codes = unpack(q.packed, bits)
        assert q.packed.dtype == np.uint8 and q.packed.shape == (3, 6, 10 * bits // 8) and q.scales.shape == (3, 6)
        assert codes.min() >= zero - top and codes.max() <= zero + top  # -2^(bits-1) is never used
        assert (np.abs(codes.astype(int) - zero).max(-1)[q.scales > 0] == top).all()  # the channel's max |w| -> top
        assert np.array_equal(quantize(q.dequantized(), bits).packed, q.packed)  # quantized values are fixed points
        assert (q.dequantized() - w).abs().max() <= torch.from_numpy(q.scales).max() / 2 + 1e-7
        assert q.scales[1, 2] == 0 and (codes[1, 2] == zero).all()


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_semantics_that_the_lowering_relies_on(bits):
    """onnxruntime's CPU QMoE: raw (E, N, K * bits / 8) codes, zero point 2^(bits-1), per-row scales;
    it selects the top k of router_probs and mixes router_weights there (divided by their sum with
    normalize_routing_weights=1); without router_weights it renormalises whatever the attribute says."""
    E, d, f, T = 4, 16, 32, 9
    g = torch.Generator().manual_seed(bits)
    x, logits = torch.randn(T, d, generator=g), 2 * torch.randn(T, E, generator=g)
    q1, q2 = quantize(torch.randn(E, f, d, generator=g), bits), quantize(torch.randn(E, d, f, generator=g), bits)
    w1, w2 = q1.dequantized(), q2.dequantized()
    experts = torch.stack([w2[e] @ F.relu(w1[e] @ x.T) for e in range(E)]).permute(2, 0, 1)  # (T, E, d)
    probs = logits.softmax(-1)
    top = probs.topk(2, -1)

    def qmoe(normalize, weights):
        inputs = ["x", "r", "w1", "s1", "", "w2", "s2", ""] + ([""] * 6 + ["p"] if weights else [])
        node = helper.make_node("QMoE", inputs, ["y"], domain="com.microsoft", k=2, expert_weight_bits=bits,
                                weights_prepacked=0, normalize_routing_weights=normalize)
        names = ["x", "r"] + (["p"] if weights else [])
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(a, n) for n, a in (("w1", q1.packed), ("s1", q1.scales), ("w2", q2.packed),
                                                        ("s2", q2.scales))])
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, dict(zip(names, (x.numpy(), logits.numpy(), probs.numpy()))))[0]

    def mixed(gates):
        return sum(gates[:, j, None] * experts[torch.arange(T), top.indices[:, j]] for j in range(2)).numpy()

    renormalised = mixed(top.values / top.values.sum(-1, keepdim=True))
    np.testing.assert_allclose(qmoe(0, weights=True), mixed(top.values), atol=1e-5)  # Switch: gate = probability
    np.testing.assert_allclose(qmoe(1, weights=True), renormalised, atol=1e-5)
    np.testing.assert_allclose(qmoe(0, weights=False), renormalised, atol=1e-5)  # the attribute is ignored


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_t5_exports_qmoe_that_matches_its_dequantized_weights(tmp_path, scheme):
    bits = BITS[scheme]
    sparse = moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)).eval()
    report = export_onnx(sparse, tmp_path / "o", OnnxOptions(quantize=scheme))
    assert [p.lowering for p in report.layers] == ["qmoe"] * 4 and not report.fallbacks
    assert all(g.moe_nodes == 2 and g.max_abs_diff < 1e-4 for g in report.graphs)  # the packing, exactly
    assert all(1e-5 < g.max_abs_diff_float < (0.05 if bits == 8 else 0.5) for g in report.graphs)
    for g in report.graphs:
        nodes, weights = qmoe_nodes(tmp_path / "o" / g.file)
        assert len(nodes) == 2
        for n in nodes:
            assert attrs(n) == {"k": 1, "activation_type": b"relu", "normalize_routing_weights": 0,
                                "expert_weight_bits": bits, "weights_prepacked": 0}
            fc1, s1, fc2, s2 = (weights[n.input[i]] for i in (2, 3, 5, 6))
            assert (list(fc1.dims), fc1.data_type) == ([4, 32, 16 * bits // 8], TensorProto.UINT8)
            assert (list(fc2.dims), fc2.data_type) == ([4, 16, 32 * bits // 8], TensorProto.UINT8)
            assert [list(s1.dims), list(s2.dims)] == [[4, 32], [4, 16]] and s1.data_type == TensorProto.FLOAT
            assert len(n.input) == 15 and n.input[14]  # router_weights: the probabilities the gates come from
        float_experts = [t for t in weights.values() if len(t.dims) == 3 and t.data_type != TensorProto.UINT8]
        assert not float_experts
    saved = json.loads((tmp_path / "o" / "moeify_onnx.json").read_text())
    assert saved["options"]["quantize"] == scheme and {r["weight_bits"] for r in saved["layers"]} == {bits}

    g = torch.Generator().manual_seed(5)
    ids, dec_ids = torch.randint(2, 64, (3, 9), generator=g), torch.randint(2, 64, (3, 4), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[-1, 6:] = 0
    names = {p.spec.name for p in report.layers}
    quantized = {p.spec.name: p.quantized for p in report.layers}
    w_in = sparse.encoder.block[1].layer[1].DenseReluDense.experts.w_in.detach().clone()
    with torch.no_grad(), dropless(sparse, names):
        floats = sparse(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, use_cache=False)
        with dequantized(sparse, quantized):
            expected = sparse(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, use_cache=False)
    assert_t5_graphs_match(tmp_path / "o", expected, ids, mask, dec_ids)
    assert torch.equal(sparse.encoder.block[1].layer[1].DenseReluDense.experts.w_in, w_in)  # restored
    assert (expected.logits - floats.logits).abs().max() < (0.05 if bits == 8 else 0.5)


class GatedSiLU(nn.Module):
    """LLaMA's MLP with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, d=8, f=20):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("normalize", [False, True])
def test_top2_gated_silu_is_interleaved_swiglu(tmp_path, normalize):
    torch.manual_seed(0)
    config = moeify.MoEConfig(num_experts=4, every=1, offset=0, top_k=2, normalize_gates=normalize)
    sparse = moeify.convert(GatedSiLU(), config).eval()
    report = export_onnx(sparse, tmp_path / "o", OnnxOptions(quantize="int4"), example_inputs=(torch.randn(2, 5, 8),))
    (node,), weights = qmoe_nodes(tmp_path / "o" / "model.onnx")
    assert attrs(node)["activation_type"] == b"swiglu" and attrs(node)["swiglu_fusion"] == 1
    assert attrs(node)["k"] == 2 and attrs(node)["normalize_routing_weights"] == int(normalize)
    assert list(weights[node.input[2]].dims) == [4, 40, 4] and node.input[4] and node.input[7]  # biases kept
    assert report.graphs[0].max_abs_diff < 1e-5 and report.graphs[0].max_abs_diff_float > 1e-5


def test_gated_gelu_falls_back_to_float_portable(tmp_path):
    sparse = moeify.convert(tiny_t5("gated-gelu"), moeify.MoEConfig(num_experts=4)).eval()
    report = export_onnx(sparse, tmp_path / "o", OnnxOptions(quantize="int8"))
    assert [p.lowering for p in report.layers] == ["portable"] * 4
    assert all("gates only with SwiGLU" in p.reason for p in report.fallbacks)
    assert all(not qmoe_nodes(tmp_path / "o" / g.file)[0] and g.max_abs_diff < 1e-4 for g in report.graphs)


class OddReLU(nn.Module):
    def __init__(self, d=8, f=9):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)))


def test_int4_needs_even_sizes_and_falls_back_with_the_reason(tmp_path):
    torch.manual_seed(0)
    sparse = moeify.convert(OddReLU(), moeify.MoEConfig(num_experts=4, every=1, offset=0)).eval()
    report = export_onnx(sparse, tmp_path / "o", OnnxOptions(quantize="int4"), example_inputs=(torch.randn(2, 5, 8),))
    (plan,) = report.fallbacks
    assert plan.lowering == "portable" and "d_model 8 and d_ff 9 must be even" in plan.reason
    assert report.graphs[0].max_abs_diff < 1e-5 and report.graphs[0].moe_nodes == 0


def test_cli_export_records_the_quantization(converted, tmp_path):
    result = run("export", converted, "--target", "onnx", "--quantize", "int8", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "4 Switch layers as com.microsoft.QMoE with int8 experts (dropless" in result.stdout
    assert "quantization error, max |Δ| vs the float model" in result.stdout
    saved = json.loads((tmp_path / "out" / "moeify_onnx.json").read_text())
    assert saved["options"]["quantize"] == "int8"
    assert all(g["max_abs_diff"] < 1e-4 and g["max_abs_diff_float"] > 0 for g in saved["graphs"])
    shown = run("inspect", tmp_path / "out" / "encoder_model.onnx")
    assert "qmoe int8" in shown.stdout and "QMoE node (int8)" in shown.stdout


@pytest.mark.parametrize("args,message", [
    (["--target", "onnx", "--mode", "portable"], "--quantize writes com.microsoft.QMoE nodes: it needs --mode fused"),
    (["--target", "onnx", "--dynamo"], "--quantize exports with the TorchScript exporter: drop --dynamo"),
    (["--target", "hf-switch"], "--quantize is an option of --target onnx, not hf-switch"),
    (["--target", "torch"], "--quantize is an option of --target onnx, not torch"),
])
def test_cli_refusals(converted, tmp_path, args, message):
    assert_user_error(run("export", converted, *args, "--quantize", "int4", "-o", tmp_path / "out"), tmp_path, message)
