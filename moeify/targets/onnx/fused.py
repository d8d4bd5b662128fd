"""Fused lowering: one com.microsoft.MoE node per Switch layer, or the reason it cannot be one.

The onnxruntime kernel (CPU from 1.23.1) takes router *logits* and applies the softmax itself.
Measured (onnxruntime 1.32): it takes the softmax over all experts, keeps the k largest and, with
normalize_routing_weights=1, divides them by their sum; the output is sum_j gate_j * expert_{e_j}(x).
That is Router's top-k for every k, with and without normalize_gates (k=1: Switch's gate * expert(x)).
It has no capacity: every token is kept, so it equals PyTorch when the layer is dropless or its eval
capacity drops nothing. Exact ties between probabilities are the one difference: the kernel takes
the higher expert index. Weight layouts are nn.Linear's, as moeify stores them: fc1 (E, d_ff, d_model),
fc2 (E, d_model, d_ff).
"""
from __future__ import annotations

from typing import Any

from moeify.targets.onnx.emit import INT64, Emit
from moeify.targets.onnx.lower import router_logits
from moeify.targets.onnx.spec import LayerSpec, Weights

DOMAIN = "com.microsoft"


def fused_activation(spec: LayerSpec) -> tuple[str | None, str | None]:
    """(activation_type, None) when the CPU kernel computes this FFN, else (None, why not)."""
    act = spec.activation
    if spec.gated:
        if act.name == "silu":  # act(x W_gate) * (x W_in) is SwiGLU with alpha 1, beta 0
            return "swiglu", None
        return None, (f"gated {act.name} FFN: the CPU MoE kernel gates only with SwiGLU and takes no "
                      "separate fc3")
    if act.fused is None:
        if act.name == "gelu":
            return None, "exact (erf) GELU: the MoE kernel's gelu is the tanh approximation"
        return None, f"{act.name} activation: the MoE kernel has no such activation_type"
    return act.fused, None


def interleave(op: Emit, gate: Any, up: Any, rows: list[int]) -> Any:
    """[g0, u0, g1, u1, ...] along the d_ff axis: the only SwiGLU layout the CPU kernel reads."""
    pair = op("Concat", op("Unsqueeze", gate, op.const([2], INT64)), op("Unsqueeze", up, op.const([2], INT64)), axis=2)
    return op("Reshape", pair, op.const(rows, INT64))


def router_input(op: Emit, spec: LayerSpec, x: Any, router_weight: Any) -> tuple[Any, Any, Any]:
    """(x's shape, the tokens (T, d), router logits (T, E) in the router dtype)."""
    shape = op("Shape", x)
    x2 = op("Reshape", x, op.const([-1, spec.d_model], INT64))
    return shape, x2, router_logits(op, spec, x2, router_weight)


def lower_fused(op: Emit, spec: LayerSpec, x: Any, w: Weights, activation_type: str) -> Any:
    shape, x2, logits = router_input(op, spec, x, w.router)
    if spec.router_dtype != spec.dtype:
        logits = op("Cast", logits, to=spec.dtype)  # the kernel wants one type; the matmul stayed float32
    fc1, fc1_bias, attrs = w.w_in, w.b_in, {}
    if activation_type == "swiglu":
        e, f, d = spec.num_experts, spec.d_ff, spec.d_model
        fc1 = interleave(op, w.w_gate, w.w_in, [e, 2 * f, d])
        if w.b_in is not None:
            fc1_bias = interleave(op, w.b_gate, w.b_in, [e, 2 * f])
        attrs = dict(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    maybe = lambda v: op.absent() if v is None else v  # noqa: E731
    y = op("MoE", x2, logits, fc1, maybe(fc1_bias), w.w_out, maybe(w.b_out), domain=DOMAIN,
           k=spec.top_k, activation_type=activation_type, normalize_routing_weights=int(spec.normalize_gates),
           **attrs)
    return op("Reshape", y, shape)
