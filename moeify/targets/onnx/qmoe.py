"""Quantized lowering: one com.microsoft.QMoE node per Switch layer, int8 or int4 expert weights.

Measured with onnxruntime 1.32's CPU kernel (docs/onnx.md): without its router_weights input, QMoE
takes the softmax over the k selected logits only, whatever normalize_routing_weights says, which is
Router's renormalised gates and not Switch's gate = probability. Given router_weights, it selects the
top k of router_probs and mixes with router_weights at those experts, divided by their sum when
normalize_routing_weights=1. So the node gets the float32 logits to select and their softmax over
all experts to mix: Router's top-k for every k, with and without normalize_gates. Like MoE it has no
capacity (dropless). Activations and the SwiGLU layout are the fused mode's (fused.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moeify.layers.switch import SwitchFFN
from moeify.targets.onnx.emit import UINT8, Emit
from moeify.targets.onnx.fused import DOMAIN, interleave, router_input
from moeify.targets.onnx.quantize import BITS, Quantized, quantize
from moeify.targets.onnx.spec import LayerSpec, Weights

# QMoE's inputs between fc2_experts_bias (7) and router_weights (14): fc3 weights, scales and bias,
# then the three zero points (implied: 2^(bits-1)).
_UNUSED_INPUTS = 6


@dataclass(frozen=True, eq=False)
class QuantizedExperts:
    bits: int
    w_in: Quantized
    w_gate: Quantized | None
    w_out: Quantized

    @classmethod
    def of(cls, layer: SwitchFFN, scheme: str) -> "QuantizedExperts":
        bits, e = BITS[scheme], layer.experts
        return cls(bits, quantize(e.w_in, bits), None if e.w_gate is None else quantize(e.w_gate, bits),
                   quantize(e.w_out, bits))


def qmoe_blocker(spec: LayerSpec, scheme: str) -> str | None:
    """Why QMoE cannot hold this layer's weights, or None."""
    if BITS[scheme] == 4 and (spec.d_model % 2 or spec.d_ff % 2):
        return f"int4 packs two weights per byte: d_model {spec.d_model} and d_ff {spec.d_ff} must be even"
    return None


def _rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[a0, b0, a1, b1, ...] along axis 1: SwiGLU's interleaved fc1 rows (weights and their scales)."""
    return np.stack([a, b], axis=2).reshape(a.shape[0], -1, *a.shape[2:])


def lower_qmoe(op: Emit, spec: LayerSpec, x: Any, w: Weights, activation_type: str, q: QuantizedExperts) -> Any:
    shape, x2, logits = router_input(op, spec, x, w.router)
    probs = op("Softmax", logits, axis=-1)  # over all experts, in the router dtype; cast for the node after
    if spec.router_dtype != spec.dtype:
        logits, probs = op("Cast", logits, to=spec.dtype), op("Cast", probs, to=spec.dtype)
    fc1, fc1_scales, fc1_bias, attrs = q.w_in.packed, q.w_in.scales, w.b_in, {}
    if activation_type == "swiglu":
        fc1, fc1_scales = _rows(q.w_gate.packed, fc1), _rows(q.w_gate.scales, fc1_scales)
        if w.b_in is not None:
            fc1_bias = interleave(op, w.b_gate, w.b_in, [spec.num_experts, 2 * spec.d_ff])
        attrs = dict(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    maybe = lambda v: op.absent() if v is None else v  # noqa: E731
    y = op("QMoE", x2, logits, op.const(fc1, UINT8), op.const(fc1_scales, spec.dtype), maybe(fc1_bias),
           op.const(q.w_out.packed, UINT8), op.const(q.w_out.scales, spec.dtype), maybe(w.b_out),
           *[op.absent() for _ in range(_UNUSED_INPUTS)], probs, domain=DOMAIN,
           k=spec.top_k, activation_type=activation_type, normalize_routing_weights=int(spec.normalize_gates),
           expert_weight_bits=q.bits, weights_prepacked=0, **attrs)  # 0: the raw layout above, on every provider
    return op("Reshape", y, shape)
