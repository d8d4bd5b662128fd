"""Constant folding that stays neutral to execution providers.

onnxruntime folds well, but the graph it saves is already placed on one provider: for fp16 the
CPU provider wraps every op it lacks an fp16 kernel for (MatMul, Softmax, MoE...) in Casts to
float32, which a CUDA user must not inherit. So moeify folds with onnx's reference evaluator:
Constant nodes become initializers, Shape of a static shape becomes its value, any default-domain
node whose inputs are all constant is evaluated, Identity and same-type Casts go, and what nothing
reads is removed. Weights are never copied: only the small tensors that folding reads are decoded.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

MAX_GROWTH_BYTES = 1 << 16  # fold a node only if its output is no larger than its inputs plus this
SHARED_BYTES = 64  # equal constants up to this size are stored once


def nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


class _Constants:
    """Initializers and folded values by name, decoded to numpy only when read."""

    def __init__(self, initializers) -> None:
        self.protos = {t.name: t for t in initializers}
        self.values: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.values or name in self.protos

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.values:
            self.values[name] = numpy_helper.to_array(self.protos[name])
        return self.values[name]

    def size(self, name: str) -> int:
        return self.values[name].nbytes if name in self.values else nbytes(self.protos[name])


def _infer(model: onnx.ModelProto) -> tuple[dict[str, list[int | None]], dict[str, int]]:
    """Inferred shapes (None marks a dynamic dimension) and element types, on a copy whose
    initializers are declared inputs: inference needs their shapes, not gigabytes of weights."""
    g = model.graph
    weights = [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in g.initializer]
    skeleton = helper.make_model(helper.make_graph(g.node, g.name, [*g.input, *weights], g.output),
                                 opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:  # contrib ops without schemas can stop inference: then fold less, not fail
        return {}, {}
    shapes, types = {}, {}
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = v.type.tensor_type
        if t.elem_type:
            types[v.name] = t.elem_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes, types


def _shape_value(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> list[int | None] | None:
    """What Shape(x)[start:end] holds, dynamic entries as None; None if x's rank is unknown."""
    dims = shapes.get(node.input[0])
    if dims is None:
        return None
    attrs = {a.name: a.i for a in node.attribute}
    return dims[attrs.get("start", 0):attrs.get("end", len(dims))]


def _gathered_dims(node: onnx.NodeProto, partial: dict[str, list[int | None]], known: _Constants):
    """Gather(Shape(x), i) when the gathered dimensions are static, though others are not."""
    if node.input[1] not in known or any(a.i for a in node.attribute):
        return None
    picked = np.asarray(partial[node.input[0]], dtype=object)[known[node.input[1]]]
    if any(d is None for d in np.atleast_1d(picked)):
        return None
    return [np.asarray(picked, dtype=np.int64)]


def _evaluate(node: onnx.NodeProto, known: _Constants, opset: int) -> list[np.ndarray] | None:
    inputs = [known[i] for i in node.input if i]
    try:
        values = ReferenceEvaluator(node, opsets={"": opset}).run(None, dict(zip(node.input, inputs)))
    except Exception:  # an op the reference evaluator lacks stays in the graph
        return None
    if sum(np.asarray(v).nbytes for v in values) > sum(a.nbytes for a in inputs) + MAX_GROWTH_BYTES:
        return None  # e.g. Expand of a scalar: cheaper to compute than to store
    return values


def _is_noop(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    """Identity, or a Cast to the type its input already has (T5's layer norm exports several)."""
    if node.op_type == "Identity":
        return True
    return node.op_type == "Cast" and types.get(node.input[0]) == next(a.i for a in node.attribute if a.name == "to")


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    known = _Constants(graph.initializer)
    shapes, types = _infer(model)
    partial: dict[str, list[int | None]] = {}  # outputs of Shape nodes that stay in the graph
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        values = None
        if node.domain not in ("", "ai.onnx") or any(o in outputs for o in node.output):
            pass
        elif _is_noop(node, types):
            rename[node.output[0]] = node.input[0]
            continue
        elif node.op_type == "Shape":
            dims = _shape_value(node, shapes)
            if dims is not None and None not in dims:
                values = [np.array(dims, np.int64)]
            elif dims is not None:
                partial[node.output[0]] = dims
        elif node.op_type == "Gather" and node.input[0] in partial:
            values = _gathered_dims(node, partial, known)
        elif node.op_type == "Constant" or node.input and all(i in known or i == "" for i in node.input):
            values = _evaluate(node, known, opset)
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            known.values[name] = np.asarray(value)
    _replace_nodes(graph, kept, known)
    return model


def _share_small_constants(nodes: list[onnx.NodeProto], known: _Constants) -> None:
    """One initializer per distinct small constant: the exporter writes the same axes and scalars
    hundreds of times."""
    first: dict[tuple, str] = {}
    alias = {}
    for name in [*known.protos, *known.values]:
        if known.size(name) <= SHARED_BYTES:
            value = known[name]
            alias[name] = first.setdefault((value.dtype.str, value.shape, value.tobytes()), name)
    for node in nodes:
        node.input[:] = [alias.get(i, i) for i in node.input]


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], known: _Constants) -> None:
    """Keep `nodes` and only the constants that something still reads (dead nodes go too)."""
    _share_small_constants(nodes, known)
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(live))
    for i in reversed(range(len(graph.initializer))):  # in place: weights are not copied
        if graph.initializer[i].name not in needed:
            del graph.initializer[i]
    graph.initializer.extend(numpy_helper.from_array(v, n) for n, v in known.values.items()
                             if n in needed and n not in known.protos)
