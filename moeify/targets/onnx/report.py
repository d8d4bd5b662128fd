"""What an .onnx file holds: inputs and outputs, op histogram, Switch layers and MoE nodes, sizes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from moeify.errors import MoeifyError
from moeify.targets.onnx.optimize import op_histogram


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _value(v: onnx.ValueInfoProto) -> dict:
    return {"name": v.name, "dtype": _dtype(v.type.tensor_type.elem_type), "shape": _dims(v)}


def _dtype(elem_type: int) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def _nbytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def describe(path: Path) -> dict:
    """Everything `moeify inspect` shows about an .onnx file, as plain data (weights not loaded)."""
    if not path.is_file():
        raise MoeifyError(f"{path} does not exist: export a model with `moeify export ... --target onnx`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError, among others
        raise MoeifyError(f"{path} is not a readable ONNX file ({str(e).splitlines()[0]})") from None
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    by_dtype: dict[str, int] = {}
    for t in graph.initializer:
        by_dtype[_dtype(t.data_type)] = by_dtype.get(_dtype(t.data_type), 0) + _nbytes(t)
    moe_nodes = []
    for n in graph.node:
        if n.op_type in ("MoE", "QMoE") and n.domain == "com.microsoft":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            fc1 = weights.get(n.input[2])  # QMoE: packed, (E, rows, d_model * bits / 8)
            quantized = {"weight_bits": attrs.get("expert_weight_bits", 4)} if n.op_type == "QMoE" else {}
            moe_nodes.append({"name": n.name, "op": n.op_type, **quantized, "k": attrs.get("k", 1),
                              "normalize_routing_weights": attrs.get("normalize_routing_weights", 0),
                              "activation_type": (attrs.get("activation_type") or b"relu").decode(),
                              "fc1_shape": list(fc1.dims) if fc1 is not None else None})
    meta = {p.key.removeprefix("moeify."): p.value for p in model.metadata_props if p.key.startswith("moeify.")}
    sidecars = [p for p in path.parent.glob(f"{path.name}.data")]
    return {
        "file": str(path), "file_bytes": path.stat().st_size + sum(p.stat().st_size for p in sidecars),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_value(v) for v in graph.input],
        "outputs": [_value(v) for v in graph.output],
        "nodes": len(graph.node), "ops": dict(op_histogram(model).most_common()),
        "initializers": len(graph.initializer), "weight_bytes": by_dtype,
        "moe_nodes": moe_nodes, "mode": meta.get("mode"), "dtype": meta.get("dtype"),
        "switch_layers": json.loads(meta["layers"]) if "layers" in meta else None,
    }
