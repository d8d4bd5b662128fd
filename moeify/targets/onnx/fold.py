"""Constant folding that stays neutral to execution providers: onnxscript's folder, fenced in.

onnxruntime folds well, but the graph it saves is already placed on one provider: for fp16 the
CPU provider wraps every op it lacks an fp16 kernel for (MatMul, Softmax, MoE...) in Casts to
float32, which a CUDA user must not inherit. So moeify folds with onnxscript's constant folder
(onnx's reference evaluator underneath) and onnx_ir's clean-up passes, never with onnxscript's
rewrite rules or onnxruntime fusions: Constant nodes become initializers, Shape of a static shape
becomes its value, any default-domain node whose inputs are all constant is evaluated, Identity,
same-type Casts and one-input Concats go, small equal constants are stored once, and what nothing
reads is removed.

What stays moeify's own, because onnxscript 0.7 does not do it:
- one whole-graph shape inference first (onnx_ir's pass, non-strict): the folder's own inference
  runs node by node and stops at any input of unknown type, and every com.microsoft.MoE output is
  one, so same-type Casts after a Switch layer would stay;
- the fence (`_should_fold`): contrib-domain nodes (the MoE node), nodes that write a graph output
  and Identity are never evaluated; an output above MAX_GROWTH_ELEMENTS is stored only if it is no
  larger than the inputs it frees (onnxscript's rule), so no Expand of a scalar fills the file;
- writing back in place: the weights stay the ModelProto's own tensors, never copied or decoded
  unless a folded node reads them; only the nodes and the new constants are serialised.
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import onnx
from onnx import helper

MAX_GROWTH_ELEMENTS = 1 << 14  # 64 KiB of float32: a larger folded output may not outgrow the inputs it frees
SHARED_ELEMENTS = 16  # 64 bytes of float32: equal constants up to this size are stored once
DEFAULT_DOMAINS = ("", "ai.onnx")


def nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold `model` in place (and return it)."""
    import onnx_ir as ir  # imported here: onnxscript takes most of a second, and only export folds
    from onnx_ir.passes import common as passes
    from onnxscript.optimizer import fold_constants_ir

    with _quiet():
        graph = ir.serde.deserialize_model(model)  # wraps the initializers, does not decode them
        passes.ShapeInferencePass(strict_mode=False, data_prop=False)(graph)
        fold_constants_ir(graph, output_size_limit=MAX_GROWTH_ELEMENTS, should_fold=_should_fold)
        ir.passes.Sequential(
            passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            passes.DeduplicateInitializersPass(size_limit=SHARED_ELEMENTS),
            passes.RemoveUnusedNodesPass(),
        )(graph)
        nodes = [ir.serde.serialize_node(n) for n in graph.graph]
        kept = set(graph.graph.initializers)
        original = {t.name for t in model.graph.initializer}
        added = [_tensor_proto(ir, name, v.const_value) for name, v in graph.graph.initializers.items()
                 if name not in original]
    del graph  # drop the IR's references to the weights before editing the list that holds them
    g = model.graph
    del g.node[:]
    g.node.extend(nodes)
    for i in reversed(range(len(g.initializer))):  # in place: weights are not copied
        if g.initializer[i].name not in kept:
            del g.initializer[i]
    g.initializer.extend(added)
    return model


def _tensor_proto(ir, name: str, tensor) -> onnx.TensorProto:
    proto = ir.serde.serialize_tensor(tensor)
    proto.name = name  # a lifted Constant's tensor may have no name of its own
    return proto


def _should_fold(node) -> bool:
    """The fence. Identity is forwarded by onnxscript (its readers read its input), so evaluating
    it would only copy the weights the exporter aliases (GPT-2's shared biases)."""
    if node.domain not in DEFAULT_DOMAINS or node.op_type == "Identity":
        return False
    return not any(o.is_graph_output() for o in node.outputs)


@contextlib.contextmanager
def _quiet():
    """onnxscript and onnx_ir log a warning for each value they may not fold or share, which is
    expected here and not the user's concern."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
