"""Portable lowering of one Switch layer: standard ONNX ops, static shapes, exact eval capacity.

x (..., d) -> x2 (T, d) -> router logits (float32) -> Softmax -> ArgMax = expert, gate = probs[expert]
-> slot = CumSum(OneHot(expert))[t, expert] - 1 -> keep = slot < C with
C = max(min_capacity, ceil(eval_capacity_factor * T / E)) computed from the shape, in integers as PyTorch does
-> ScatterND: which token fills each of the E*C slots -> Gather into (E, C, d) -> batched MatMul per expert
-> Gather each kept token's row back, times its gate; dropped tokens give exactly 0.
A running count in token order gives each token its slot, so earlier tokens win, as in PyTorch.
"""
from __future__ import annotations

from typing import Any

from moeify.config import decimal_ratio
from moeify.errors import MoeifyError
from moeify.targets.onnx.emit import INT64, Emit
from moeify.targets.onnx.spec import LayerSpec, Weights


def router_logits(op: Emit, spec: LayerSpec, x2: Any, router_weight: Any) -> Any:
    """(T, E) logits in the router dtype: the router never runs in half precision."""
    xr = x2 if spec.router_dtype == spec.dtype else op("Cast", x2, to=spec.router_dtype)
    return op("Gemm", xr, router_weight, transB=1)


def linear(op: Emit, x: Any, weight: Any, bias: Any) -> Any:
    """x (E, C, in) @ weight(E, out, in).T + bias (E, out): one batched MatMul for all experts."""
    y = op("MatMul", x, op("Transpose", weight, perm=[0, 2, 1]))  # the transpose folds into the weight
    return y if bias is None else op("Add", y, op("Unsqueeze", bias, op.const([1], INT64)))


def experts(op: Emit, spec: LayerSpec, xb: Any, w: Weights) -> Any:
    """The stacked expert FFNs on (E, C, d) slots."""
    h = linear(op, xb, w.w_in, w.b_in)
    act = spec.activation.lower
    if spec.gated:
        h = op("Mul", act(op, linear(op, xb, w.w_gate, w.b_gate), spec.dtype), h)
    else:
        h = act(op, h, spec.dtype)
    return linear(op, h, w.w_out, w.b_out)


def capacity(op: Emit, spec: LayerSpec, tokens: Any) -> Any:
    """max(min_capacity, ceil(p * T / (q * E))) as an int64 (1,) tensor, with factor = p / q exactly,
    in integers as moeify.config.expert_capacity computes it: (a + b - 1) // b is ceil(a / b) for a, b > 0."""
    p, q = decimal_ratio(spec.eval_capacity_factor)
    if p >= 2 ** 31 or q * spec.num_experts >= 2 ** 31:  # keeps p * T and the sum far from int64's range
        raise MoeifyError(f"{spec.name or 'a layer'}: eval capacity factor {spec.eval_capacity_factor} has too many "
                          "digits for the portable graph's integer capacity: round it to a few decimals")
    b = op.const([q * spec.num_experts], INT64)
    c = op("Div", op("Sub", op("Add", op("Mul", op.const([p], INT64), tokens), b), op.const([1], INT64)), b)
    return op("Max", c, op.const([spec.min_capacity], INT64))


def lower_portable(op: Emit, spec: LayerSpec, x: Any, w: Weights) -> Any:
    num_experts, one = spec.num_experts, op.const([1], INT64)
    shape = op("Shape", x)
    x2 = op("Reshape", x, op.const([-1, spec.d_model], INT64))  # (T, d), (batch, position) order
    probs = op("Softmax", router_logits(op, spec, x2, w.router), axis=-1)  # (T, E)
    expert = op("ArgMax", probs, axis=-1, keepdims=1)  # (T, 1): the first maximum, as torch.max
    gate = op("GatherElements", probs, expert, axis=1)  # (T, 1)
    onehot = op("OneHot", op("Squeeze", expert, one), op.const(num_experts, INT64), op.const([0, 1], INT64))
    slot = op("Sub", op("GatherElements", op("CumSum", onehot, op.const(0, INT64)), expert, axis=1), one)  # (T, 1)
    tokens = op("Shape", x2, start=0, end=1)  # (1,) = T
    cap = capacity(op, spec, tokens)
    keep = op("Less", slot, cap)  # (T, 1)
    dest = op("Add", op("Mul", expert, cap), slot)  # (T, 1) row of (E*C, d)
    token_ids = op("Range", op.const(0, INT64), op("Squeeze", tokens, op.const([0], INT64)), op.const(1, INT64))
    slots = op("Mul", op.const([num_experts], INT64), cap)  # (1,) = E*C
    # Which token fills each slot. Dropped tokens write past E*C, one row each, so that no two
    # writes share an index (ScatterND leaves duplicates undefined); empty slots keep T, a zero row.
    spill = op("Add", slots, op("Unsqueeze", token_ids, one))
    filled = op("ScatterND", op("Expand", tokens, op("Add", slots, tokens)), op("Where", keep, dest, spill), token_ids)
    slot_token = op("Slice", filled, op.const([0], INT64), slots)  # (E*C,)
    padded = op("Concat", x2, op.const([[0.0] * spec.d_model], spec.dtype), axis=0)  # (T + 1, d)
    xb = op("Reshape", op("Gather", padded, slot_token, axis=0), op.const([num_experts, -1, spec.d_model], INT64))
    yb = op("Reshape", experts(op, spec, xb, w), op.const([-1, spec.d_model], INT64))  # (E*C, d)
    back = op("Gather", yb, op("Squeeze", op("Where", keep, dest, op.const([0], INT64)), one), axis=0)  # (T, d)
    gate = gate if spec.router_dtype == spec.dtype else op("Cast", gate, to=spec.dtype)
    y = op("Where", keep, op("Mul", back, gate), op.const([0.0], spec.dtype))  # dropped tokens: exactly 0
    return op("Reshape", y, shape)

