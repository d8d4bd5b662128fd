"""Graph clean-up after export (dropout, untyped hints), metadata, saving, node counts."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx

from moeify.targets.onnx.fold import nbytes
from moeify.targets.onnx.session import EXTERNAL_DATA_BYTES


def node_count(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def op_histogram(model: onnx.ModelProto) -> Counter:
    return Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def strip_dropout(model: onnx.ModelProto) -> int:
    """Remove Dropout nodes (identity at inference), rewiring their consumers; returns how many."""
    graph = model.graph
    drops = [n for n in graph.node if n.op_type == "Dropout" and n.domain == ""]
    rename = {n.output[0]: n.input[0] for n in drops}
    outputs = {o.name for o in graph.output}
    for n in drops:
        if n.output[0] in outputs:  # a graph output keeps its name: keep an Identity in its place
            graph.node.append(onnx.helper.make_node("Identity", [n.input[0]], [n.output[0]]))
            rename.pop(n.output[0])
        graph.node.remove(n)
    for n in graph.node:
        for i, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[i] = name
    return len(drops)


def drop_untyped_value_info(model: onnx.ModelProto) -> None:
    """The exporter leaves type-less hints on contrib-op outputs; the full checker rejects them."""
    keep = [v for v in model.graph.value_info if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def pin_output_dims(model: onnx.ModelProto, sizes: dict[str, list[int | None]]) -> None:
    """Give graph outputs their static sizes (None: a dynamic axis, left named). Shape inference
    stops at contrib ops, so the exporter may only have a made-up name for, say, the vocabulary."""
    for output in model.graph.output:
        for dim, size in zip(output.type.tensor_type.shape.dim, sizes.get(output.name, [])):
            if size is not None:
                dim.dim_value = size


def save(model: onnx.ModelProto, path: Path) -> None:
    """Weights inline below 1 GiB, else in path.data beside the graph (protobuf's 2 GiB limit)."""
    big = sum(nbytes(t) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
              location=f"{path.name}.data" if big else None)


def annotate(model: onnx.ModelProto, metadata: dict[str, object]) -> None:
    """Record moeify's choices (mode, per-layer lowering) in the file itself, for `moeify inspect`."""
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"moeify.{key}", json.dumps(value) if not isinstance(value, str) else value
