"""The Switch layer as one export unit: an autograd.Function whose symbolic writes our lowering.

While exporting, each SwitchFFN's forward is replaced by a call to `SwitchUnit`; the tracer
records one opaque node per layer and the exporter asks `symbolic` for its ONNX. The routing is
therefore exactly the ops in lower.py / fused.py, never whatever the tracer saw of dispatch().
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from moeify.layers.switch import SwitchFFN, switch_layers
from moeify.targets.onnx.emit import Emit, LegacyEmit
from moeify.targets.onnx.fused import fused_activation, lower_fused
from moeify.targets.onnx.lower import lower_portable
from moeify.targets.onnx.qmoe import QuantizedExperts, lower_qmoe, qmoe_blocker
from moeify.targets.onnx.spec import LayerSpec, Weights


@dataclass(frozen=True)
class LayerLowering:
    """How one Switch layer is lowered; `reason` says why a fused-mode layer stayed portable."""

    spec: LayerSpec
    lowering: str  # "fused", "qmoe" (quantized experts) or "portable"
    activation_type: str | None = None  # com.microsoft.MoE / QMoE activation_type
    reason: str | None = None
    quantized: QuantizedExperts | None = field(default=None, compare=False, repr=False)  # "qmoe" only

    def lower(self, op: Emit, x: Any, w: Weights) -> Any:
        if self.lowering == "fused":
            return lower_fused(op, self.spec, x, w, self.activation_type)
        if self.lowering == "qmoe":
            return lower_qmoe(op, self.spec, x, w, self.activation_type, self.quantized)
        return lower_portable(op, self.spec, x, w)


def plan_layers(model: nn.Module, mode: str, quantize: str | None = None) -> list[LayerLowering]:
    """Each layer's lowering; with `quantize` ("int8", "int4"), fused layers become QMoE."""
    plans = []
    for name, layer in switch_layers(model).items():
        spec = LayerSpec.of(name, layer)
        if mode == "portable":
            plans.append(LayerLowering(spec, "portable"))
            continue
        activation_type, reason = fused_activation(spec)  # QMoE's CPU kernel has MoE's activations
        if activation_type and quantize:
            reason = qmoe_blocker(spec, quantize)
            if reason is None:
                plans.append(LayerLowering(spec, "qmoe", activation_type,
                                           quantized=QuantizedExperts.of(layer, quantize)))
                continue
            activation_type = None  # quantized exports have no float MoE layers: portable, with the reason
        plans.append(LayerLowering(spec, "fused", activation_type) if activation_type
                     else LayerLowering(spec, "portable", reason=reason))
    return plans


class SwitchUnit(torch.autograd.Function):
    """symbolic: our ONNX lowering. forward only stands in for the tracer, which needs the output's
    shape and dtype; it cannot run the layer, because the tracer refuses tensors inside a Function
    that are not its inputs (the layer's buffers and modules). Values after a Switch layer are
    therefore placeholders during tracing, which only matters to Python control flow on hidden
    values, which tracing cannot capture anyway; the parity check runs the real layers.
    """

    @staticmethod
    def forward(ctx, x, router, w_in, w_gate, w_out, b_in, b_gate, b_out, plan, opset):
        return x.clone()

    @staticmethod
    def symbolic(g, x, router, w_in, w_gate, w_out, b_in, b_gate, b_out, plan, opset):
        y = plan.lower(LegacyEmit(g, opset), x, Weights(router, w_in, w_gate, w_out, b_in, b_gate, b_out))
        y.setType(x.type())  # same shape and dtype as the input: keeps shape inference going
        return y


def _unit_forward(layer: SwitchFFN, plan: LayerLowering, opset: int, called: list[str],
                  x: torch.Tensor) -> torch.Tensor:
    called.append(plan.spec.name)
    return SwitchUnit.apply(x, *Weights.of(layer), plan, opset)


@contextlib.contextmanager
def export_units(model: nn.Module, plans: list[LayerLowering], opset: int,
                 forward=_unit_forward) -> Iterator[list[str]]:
    """Route every planned layer through `forward` (SwitchUnit by default); parameter names stay
    those of the model. Yields the names of the layers the traced graph called, in order."""
    modules = dict(model.named_modules())
    called: list[str] = []
    try:
        for plan in plans:
            layer = modules[plan.spec.name]
            layer.forward = functools.partial(forward, layer, plan, opset, called)
        yield called
    finally:
        for plan in plans:
            modules[plan.spec.name].__dict__.pop("forward", None)
