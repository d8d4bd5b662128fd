"""Constant folding (onnxscript's folder behind moeify's fence) leaves nothing foldable and nothing dead."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tiny import tiny_net, tiny_t5

import moeify
from moeify.targets.onnx import OnnxOptions, export_onnx
from moeify.targets.onnx.fold import MAX_GROWTH_ELEMENTS, fold_constants

DEFAULT_DOMAINS = ("", "ai.onnx")


def leftovers(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node (and initializer) names that folding should have removed, by reason."""
    g = model.graph
    constant = {t.name for t in g.initializer}
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    weights = [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in g.initializer]
    skeleton = helper.make_model(helper.make_graph(g.node, g.name, [*g.input, *weights], g.output),
                                 opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(skeleton).graph
    types = {v.name: v.type.tensor_type for v in [*inferred.value_info, *inferred.input]}

    def static(name):
        t = types.get(name)
        return t is not None and t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim)

    return {
        "all inputs constant": [n.name for n in g.node if n.domain in DEFAULT_DOMAINS and n.input
                                and all(i in constant or not i for i in n.input)],
        "Constant or Identity": [n.name for n in g.node if n.op_type in ("Constant", "Identity")],
        "Cast to its own type": [n.name for n in g.node if n.op_type == "Cast" and n.input[0] in types
                                 and types[n.input[0]].elem_type == n.attribute[0].i],
        "Shape of a static shape": [n.name for n in g.node if n.op_type == "Shape" and static(n.input[0])],
        "dead node": [n.name for n in g.node if not any(o in read for o in n.output)],
        "unread initializer": sorted(constant - read),
    }


def nothing_left(model: onnx.ModelProto, kept: set[str] = frozenset()) -> None:
    found = {reason: sorted(set(names) - kept) for reason, names in leftovers(model).items()}
    assert found == {reason: [] for reason in found}


@pytest.mark.parametrize("mode, dtype", [("fused", "fp32"), ("portable", "fp32"), ("fused", "fp16")])
def test_exported_t5_graphs_have_nothing_left_to_fold(tmp_path, mode, dtype):
    sparse = moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)).eval()
    export_onnx(sparse, tmp_path / "o", OnnxOptions(mode=mode, dtype=dtype, optimize=False, check=False))
    for name in ("encoder_model.onnx", "decoder_model.onnx"):
        model = onnx.load(str(tmp_path / "o" / name))
        nothing_left(model)  # no exceptions: nothing is kept foldable on purpose in these graphs
        moe = [n for n in model.graph.node if n.op_type == "MoE" and n.domain == "com.microsoft"]
        assert len(moe) == (2 if mode == "fused" else 0)
        weights = {t.name for t in model.graph.initializer}
        for node in moe:  # fc1, fc2 weights: the model's own stacked expert tensors, by name, untouched
            assert node.input[2].endswith(".experts.w_in") and node.input[4].endswith(".experts.w_out")
            assert {node.input[2], node.input[4]} <= weights


def test_exported_custom_module_has_nothing_left_to_fold(tmp_path):
    sparse = moeify.convert(tiny_net(), moeify.MoEConfig(num_experts=3, every=1)).eval()
    export_onnx(sparse, tmp_path / "o", OnnxOptions(mode="portable", optimize=False, check=False),
                example_inputs=(torch.randn(2, 5, 8),))
    nothing_left(onnx.load(str(tmp_path / "o" / "model.onnx")))


def const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def fenced_model() -> onnx.ModelProto:
    """Everything the folder may fold, next to everything moeify's fence keeps."""
    f = TensorProto.FLOAT
    big = MAX_GROWTH_ELEMENTS * 4
    nodes = [
        helper.make_node("Constant", [], ["two"], name="two", value=const("", [2.0])),
        helper.make_node("Add", ["two", "one"], ["three"], name="add_consts"),  # folds to 3
        helper.make_node("Mul", ["x", "three"], ["x3"], name="mul"),
        helper.make_node("Identity", ["w"], ["w_alias"], name="alias"),  # the exporter's tied weights
        helper.make_node("MatMul", ["x3", "w_alias"], ["h"], name="matmul"),
        helper.make_node("Cast", ["h"], ["h_cast"], name="same_type_cast", to=f),
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "i0"], ["batch"], name="dynamic_dim", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"], name="unsqueeze_batch"),
        helper.make_node("Shape", ["w"], ["w_shape"], name="static_shape"),  # [4, 4]: a constant
        helper.make_node("Gather", ["w_shape", "axes_1"], ["width1"], name="static_dim", axis=0),
        helper.make_node("Concat", ["batch1", "width1"], ["hw"], name="concat", axis=0),
        helper.make_node("Reshape", ["h_cast", "hw"], ["y"], name="reshape"),
        helper.make_node("Expand", ["one", "big_shape"], ["ones"], name="expand_big"),  # would grow the file
        helper.make_node("ReduceSum", ["ones"], ["total"], name="reduce", keepdims=0),
        helper.make_node("Add", ["total", "x_scalar"], ["z"], name="uses_expand"),
        helper.make_node("Relu", ["x"], ["unused"], name="dead"),
        helper.make_node("MoE", ["w", "one"], ["contrib"], name="contrib_node", domain="com.microsoft"),
        helper.make_node("Add", ["contrib", "x_scalar"], ["c"], name="uses_contrib"),
        helper.make_node("Add", ["one", "one"], ["const_out"], name="writes_output"),
    ]
    inits = [const("one", [1.0]), const("w", np.arange(16).reshape(4, 4)), const("axes_1", [1], np.int64),
             const("i0", 0, np.int64), const("axes", [0], np.int64), const("big_shape", [big], np.int64),
             const("unread", [5.0])]
    inputs = [helper.make_tensor_value_info("x", f, ["batch", 4]), helper.make_tensor_value_info("x_scalar", f, [])]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("y", "z", "c", "const_out")]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=opsets)


def test_the_fence_keeps_contrib_nodes_outputs_and_growth_and_folds_the_rest():
    model = fold_constants(fenced_model())
    names = [n.name for n in model.graph.node]
    assert names == ["mul", "matmul", "shape", "dynamic_dim", "unsqueeze_batch", "concat", "reshape",
                     "expand_big", "reduce", "uses_expand", "contrib_node", "uses_contrib", "writes_output"]
    # Kept on purpose, though their inputs are all constant: the MoE-domain node, a graph output's
    # writer, and an Expand whose value would be 4x MAX_GROWTH_ELEMENTS floats in the file.
    nothing_left(model, kept={"contrib_node", "writes_output", "expand_big"})
    node = {n.name: n for n in model.graph.node}
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert list(node["matmul"].input) == ["x3", "w"]  # the alias is read through, not copied
    assert list(node["contrib_node"].input) == ["w", "one"]  # the contrib node's weights stay as they were
    assert values["three"].tolist() == [3.0]
    assert values[node["concat"].input[1]].tolist() == [4]  # Shape of a static shape, then Gather
    assert node["reshape"].input[0] == "h"  # the same-type Cast is gone
    assert sum(v.size for v in values.values()) < 64  # no weight copied, no big constant stored
    assert "unread" not in values and "dead" not in names
