"""The torch.export route: each Switch layer becomes the custom op moeify::switch_ffn, which
onnxscript translates with the same lowering as the TorchScript route (needs onnxscript).

torch.export sees an opaque op with a fake kernel (same shape and dtype as its input), so the
routing never reaches decomposition; the translation emits lower.py / fused.py through ScriptEmit.
"""
from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.layers.switch import SwitchFFN
from moeify.targets.onnx.graphs import Graph
from moeify.targets.onnx.options import OnnxOptions
from moeify.targets.onnx.spec import Weights
from moeify.targets.onnx.unit import LayerLowering, export_units

_PLANS: dict[int, tuple[SwitchFFN, LayerLowering, int]] = {}  # key carried by the op -> layer, plan, opset


@torch.library.custom_op("moeify::switch_ffn", mutates_args=())
def switch_ffn(x: torch.Tensor, router: torch.Tensor, w_in: torch.Tensor, w_gate: torch.Tensor | None,
               w_out: torch.Tensor, b_in: torch.Tensor | None, b_gate: torch.Tensor | None,
               b_out: torch.Tensor | None, key: int) -> torch.Tensor:
    return SwitchFFN.forward(_PLANS[key][0], x)  # eager: the PyTorch layer itself


@switch_ffn.register_fake
def _(x, router, w_in, w_gate, w_out, b_in, b_gate, b_out, key):
    return torch.empty_like(x)


class ScriptEmit:
    """Emit through onnxscript opsets, inside the dynamo exporter's translation."""

    def __init__(self, opset: int) -> None:
        import onnxscript
        from onnxscript import onnx_opset

        self.opset = opset
        self._ops = getattr(onnx_opset, f"opset{opset}")
        self._values = onnxscript.values

    def __call__(self, op_type: str, *inputs: Any, domain: str = "", outputs: int = 1, **attrs: Any) -> Any:
        # `outputs` is the Emit protocol's; onnxscript returns a tuple for ops with several outputs itself.
        if domain:  # onnx has no schema for onnxruntime's contrib ops: lend it onnxruntime's
            op = self._values.Op(self._values.Opset(domain, 1), op_type, contrib_schema(op_type, domain))
            return op(*inputs, **attrs)
        return getattr(self._ops, op_type)(*inputs, **attrs)

    def const(self, value: Any, dtype: int) -> Any:
        array = np.asarray(value, dtype=onnx.helper.tensor_dtype_to_np_dtype(dtype))
        return self._ops.Constant(value=onnx.numpy_helper.from_array(array))

    def absent(self) -> Any:
        return None


@functools.cache
def contrib_schema(name: str, domain: str) -> onnx.defs.OpSchema:
    """onnxruntime's registered schema of a contrib op, as an onnx OpSchema (for onnxscript)."""
    from onnxruntime.capi import _pybind_state

    found = [s for s in _pybind_state.get_all_operator_schema() if s.name == name and s.domain == domain]
    if not found:
        raise MoeifyError(f"this onnxruntime has no {domain}.{name} operator: install onnxruntime>=1.23.1")
    ort_schema = max(found, key=lambda s: s.since_version)
    S = onnx.defs.OpSchema

    def params(formal):
        return [S.FormalParameter(p.name, p.typeStr, param_option=S.FormalParameterOption.__members__[p.option.name])
                for p in formal]

    return S(name, domain, ort_schema.since_version, inputs=params(ort_schema.inputs),
             outputs=params(ort_schema.outputs),
             type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in ort_schema.type_constraints],
             attributes=[S.Attribute(a.name, S.AttrType.__members__[a.type.name], required=False)
                         for a in ort_schema.attributes.values()])


def _translate(x, router, w_in, w_gate, w_out, b_in, b_gate, b_out, key):
    _, plan, opset = _PLANS[key]
    return plan.lower(ScriptEmit(opset), x, Weights(router, w_in, w_gate, w_out, b_in, b_gate, b_out))


def _op_forward(layer: SwitchFFN, plan: LayerLowering, opset: int, called: list[str], x: torch.Tensor) -> torch.Tensor:
    called.append(plan.spec.name)
    key = id(layer)
    _PLANS[key] = (layer, plan, opset)
    return torch.ops.moeify.switch_ffn(x, *Weights.of(layer), key)


def capture_dynamo(graph: Graph, model: nn.Module, plans: list[LayerLowering], options: OnnxOptions,
                   path: Path) -> list[str]:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise MoeifyError("--dynamo needs onnxscript: pip install onnxscript, or leave out --dynamo") from None
    graph.module.eval()
    try:
        with warnings.catch_warnings(), export_units(model, plans, options.opset, forward=_op_forward) as called:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph.module, graph.sample(2, 7, 0), dynamo=True, opset_version=options.opset,
                input_names=graph.input_names, output_names=graph.output_names, dynamic_axes=graph.dynamic_axes,
                custom_translation_table={torch.ops.moeify.switch_ffn.default: _translate}, verbose=False)
        program.save(str(path))
    except torch.onnx.errors.OnnxExporterError as e:
        while e.__cause__ is not None:  # the root cause says what broke, the wrapper only which step
            e = e.__cause__
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[0]
        raise MoeifyError(f"the dynamo exporter failed ({why}): export without --dynamo") from None
    finally:
        _PLANS.clear()
    return list(dict.fromkeys(called))
