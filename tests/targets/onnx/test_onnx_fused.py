"""Fused ONNX: com.microsoft.MoE in onnxruntime equals PyTorch with room for every token."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from onnxtools import assert_t5_graphs_match, run
from tiny import tiny_net, tiny_t5
from torch import nn

import moeify
from moeify.targets.onnx import OnnxOptions, export_onnx
from moeify.targets.onnx.verify import dropless

FUSED = OnnxOptions(mode="fused")


def moe_nodes(path) -> list[onnx.NodeProto]:
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return [n for n in model.graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]


def attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_kernel_semantics_that_the_lowering_relies_on():
    """The installed onnxruntime: fc1 (E, d_ff, d), fc2 (E, d, d_ff), logits in, softmax inside,
    and with normalize_routing_weights=0 the output is softmax(logits)[e] * expert_e(x)."""
    E, d, f, T = 4, 8, 16, 10
    g = torch.Generator().manual_seed(0)
    x, logits = torch.randn(T, d, generator=g), 2 * torch.randn(T, E, generator=g)
    w1, w2 = torch.randn(E, f, d, generator=g), torch.randn(E, d, f, generator=g)
    node = helper.make_node("MoE", ["x", "r", "w1", "", "w2"], ["y"], domain="com.microsoft", k=1,
                            activation_type="relu", normalize_routing_weights=0)
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [T, d]), ("r", [T, E]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, d])],
        [onnx.numpy_helper.from_array(w.numpy(), n) for n, w in (("w1", w1), ("w2", w2))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy(), "r": logits.numpy()})[0]
    gate, e = logits.softmax(-1).max(-1)
    expected = torch.stack([gate[t] * (w2[e[t]] @ F.relu(w1[e[t]] @ x[t])) for t in range(T)])
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-5)


def test_t5_v1_0_fuses_every_layer_and_matches_dropless_pytorch(tmp_path):
    sparse = moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4, eval_capacity_factor=0.5,
                                                              min_capacity=1)).eval()
    report = export_onnx(sparse, tmp_path / "o", FUSED)
    assert [p.lowering for p in report.layers] == ["fused"] * 4 and not report.fallbacks
    assert [g.moe_nodes for g in report.graphs] == [2, 2]
    for f in ("encoder_model.onnx", "decoder_model.onnx"):
        nodes = moe_nodes(tmp_path / "o" / f)
        expected = {"k": 1, "activation_type": b"relu", "normalize_routing_weights": 0}
        assert len(nodes) == 2 and all(attrs(n) == expected for n in nodes)

    g = torch.Generator().manual_seed(5)
    ids, dec_ids = torch.randint(2, 64, (3, 9), generator=g), torch.randint(2, 64, (3, 4), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    with torch.no_grad():
        capped = sparse(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, use_cache=False)
        with dropless(sparse, {p.spec.name for p in report.layers}):
            out = sparse(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, use_cache=False)
    hidden = assert_t5_graphs_match(tmp_path / "o", out, ids, mask, dec_ids)
    # Dropless is a real difference: at capacity factor 0.5 PyTorch drops tokens, the kernel does not.
    assert np.abs(hidden - capped.encoder_last_hidden_state.numpy()).max() > 1e-2


def test_t5_v1_1_gated_gelu_falls_back_to_portable_per_layer(tmp_path):
    sparse = moeify.convert(tiny_t5("gated-gelu"), moeify.MoEConfig(num_experts=4)).eval()
    report = export_onnx(sparse, tmp_path / "o", FUSED)
    assert [p.lowering for p in report.layers] == ["portable"] * 4
    assert all("gates only with SwiGLU" in p.reason for p in report.fallbacks) and len(report.fallbacks) == 4
    assert all(not moe_nodes(tmp_path / "o" / g.file) for g in report.graphs)
    assert all(g.max_abs_diff < 1e-4 for g in report.graphs)  # exact capacity semantics, as portable


def test_custom_mlp_gelu_with_biases_is_fused(tmp_path):
    sparse = moeify.convert(tiny_net(), moeify.MoEConfig(num_experts=3, every=1, eval_capacity_factor=1.0,
                                                         min_capacity=1)).eval()
    export_onnx(sparse, tmp_path / "o", FUSED, example_inputs=(torch.randn(2, 5, 8),))
    nodes = moe_nodes(tmp_path / "o" / "model.onnx")
    assert len(nodes) == 4 and {attrs(n)["activation_type"] for n in nodes} == {b"gelu"}
    assert all(n.input[3] and n.input[5] for n in nodes)  # fc1 and fc2 biases
    x = torch.randn(4, 9, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), dropless(sparse, {f"h.{i}.mlp.moe" for i in range(4)}):
        expected = sparse(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "o" / "model.onnx", {"x": x}), expected, atol=1e-4, rtol=0)


class GatedSiLU(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d=8, f=20, bias=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ExactGELU(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc, self.proj, self.act = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.GELU()

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


@pytest.mark.parametrize("bias", [False, True])
def test_gated_silu_fuses_as_interleaved_swiglu(tmp_path, bias):
    torch.manual_seed(0)
    sparse = moeify.convert(GatedSiLU(bias=bias), moeify.MoEConfig(num_experts=4, every=1, offset=0)).eval()
    report = export_onnx(sparse, tmp_path / "o", FUSED, example_inputs=(torch.randn(2, 5, 8),))
    (node,) = moe_nodes(tmp_path / "o" / "model.onnx")
    assert attrs(node)["activation_type"] == b"swiglu" and attrs(node)["swiglu_fusion"] == 1
    assert report.graphs[0].max_abs_diff < 1e-5
    x = torch.randn(3, 11, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), dropless(sparse, {""}):
        expected = sparse(x).numpy()
    # The whole module was one FFN: it became the SwitchFFN, whose forward names the input.
    got = run(tmp_path / "o" / "model.onnx", {"hidden_states": x})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_exact_gelu_stays_portable_with_its_reason(tmp_path):
    torch.manual_seed(0)
    sparse = moeify.convert(ExactGELU(), moeify.MoEConfig(num_experts=4, every=1, offset=0)).eval()
    report = export_onnx(sparse, tmp_path / "o", FUSED, example_inputs=(torch.randn(2, 5, 8),))
    (plan,) = report.fallbacks
    assert plan.reason == "exact (erf) GELU: the MoE kernel's gelu is the tanh approximation"
    assert not moe_nodes(tmp_path / "o" / "model.onnx") and report.graphs[0].max_abs_diff < 1e-5


def test_fp16_keeps_the_router_in_float32(tmp_path):
    sparse = moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)).eval()
    report = export_onnx(sparse, tmp_path / "o", OnnxOptions(mode="fused", dtype="fp16"))
    assert all(g.moe_nodes == 2 and g.max_abs_diff < 2e-2 for g in report.graphs)
    model = onnx.load(str(tmp_path / "o" / "encoder_model.onnx"))
    weights = {t.name: t.data_type for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]  # the routers
    assert len(gemms) == 2 and all(weights[n.input[1]] == TensorProto.FLOAT for n in gemms)
    assert all(weights[n.input[2]] == TensorProto.FLOAT16 for n in moe_nodes(tmp_path / "o" / "encoder_model.onnx"))
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert sparse.encoder.block[1].layer[1].DenseReluDense.router.weight.dtype == torch.float32  # untouched


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_only_transformers_export_as_one_fused_model(tmp_path, arch):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":  # GELU (tanh) with biases, in Conv1D layout
        dense = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, initializer_range=0.5))
    else:  # gated SiLU: swiglu
        dense = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, vocab_size=50,
                                             initializer_range=0.5))
    sparse = moeify.convert(dense.eval(), moeify.MoEConfig(num_experts=4, every=1)).eval()
    report = export_onnx(sparse, tmp_path / "o", FUSED)
    nodes = moe_nodes(tmp_path / "o" / "model.onnx")
    activation = b"gelu" if arch == "gpt2" else b"swiglu"
    assert len(nodes) == 2 and {attrs(n)["activation_type"] for n in nodes} == {activation}
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    (graph,) = report.graphs
    assert graph.max_abs_diff < 1e-4
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), dropless(sparse, {p.spec.name for p in report.layers}):
        expected = sparse(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    got = run(tmp_path / "o" / "model.onnx", {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert np.abs(expected.numpy()).max() > 0.1  # not trivially small
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=0)
