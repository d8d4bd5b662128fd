"""Portable lowering of one Switch layer: standard ONNX ops, static shapes, exact eval capacity.

x (..., d) -> x2 (T, d) -> router logits (float32) -> Softmax -> the top-k experts and their gates
(k = 1: ArgMax, gate = probs[expert]; k > 1: TopK, optionally renormalised) -> A = k * T assignments
in choice-major order a = choice * T + token -> slot = CumSum(OneHot(expert))[a, expert] - 1 -> keep =
slot < C with C = max(min_capacity, ceil(eval_capacity_factor * k * T / E)) computed from the shape, in
integers as PyTorch does (dropless: C = the busiest expert's count, every assignment kept) -> ScatterND:
which token fills each of the E*C slots -> Gather into (E, C, d) -> batched MatMul per expert -> Gather
each kept assignment's row back, times its gate; dropped ones give exactly 0; a token sums its k choices.
A running count in choice-major order gives each assignment its slot, so every first choice comes before
any second choice and earlier tokens win within a choice, as in PyTorch.
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


def route(op: Emit, spec: LayerSpec, probs: Any) -> tuple[Any, Any]:
    """(expert, gate), each (A, 1), the gate in the router dtype: every token's k choices, choice-major
    (row a = choice * T + token), as Router and dispatch() order them."""
    if spec.top_k == 1:  # ArgMax, not TopK: the first maximum, as torch.max, and the top-1 graph as before
        expert = op("ArgMax", probs, axis=-1, keepdims=1)  # (T, 1)
        gate = op("GatherElements", probs, expert, axis=1)  # (T, 1)
        # gate / gate, as Router computes it: 1.0 for every token, the expert output unscaled.
        return expert, (op("Div", gate, gate) if spec.normalize_gates else gate)
    gate, expert = op("TopK", probs, op.const([spec.top_k], INT64), axis=-1, largest=1, sorted=1, outputs=2)
    if spec.normalize_gates:  # in the router dtype, before any cast, as Router does
        gate = op("Div", gate, op("ReduceSum", gate, op.const([-1], INT64), keepdims=1))
    flat = op.const([-1, 1], INT64)
    return (op("Reshape", op("Transpose", expert, perm=[1, 0]), flat),
            op("Reshape", op("Transpose", gate, perm=[1, 0]), flat))


def capacity(op: Emit, spec: LayerSpec, tokens: Any) -> Any:
    """max(min_capacity, ceil(p * k * T / (q * E))) as an int64 (1,) tensor, with factor = p / q exactly,
    in integers as moeify.config.expert_capacity computes it: (a + b - 1) // b is ceil(a / b) for a, b > 0."""
    p, q = decimal_ratio(spec.eval_capacity_factor)
    pk = p * spec.top_k  # every token's k choices all need slots
    if pk >= 2 ** 31 or q * spec.num_experts >= 2 ** 31:  # keeps p * k * T and the sum far from int64's range
        raise MoeifyError(f"{spec.name or 'a layer'}: eval capacity factor {spec.eval_capacity_factor} has too many "
                          "digits for the portable graph's integer capacity: round it to a few decimals")
    b = op.const([q * spec.num_experts], INT64)
    c = op("Div", op("Sub", op("Add", op("Mul", op.const([pk], INT64), tokens), b), op.const([1], INT64)), b)
    return op("Max", c, op.const([spec.min_capacity], INT64))


def lower_portable(op: Emit, spec: LayerSpec, x: Any, w: Weights) -> Any:
    num_experts, k, one = spec.num_experts, spec.top_k, op.const([1], INT64)
    shape = op("Shape", x)
    x2 = op("Reshape", x, op.const([-1, spec.d_model], INT64))  # (T, d), (batch, position) order
    probs = op("Softmax", router_logits(op, spec, x2, w.router), axis=-1)  # (T, E)
    expert, gate = route(op, spec, probs)  # (A, 1) each, A = k * T
    onehot = op("OneHot", op("Squeeze", expert, one), op.const(num_experts, INT64), op.const([0, 1], INT64))
    slot = op("Sub", op("GatherElements", op("CumSum", onehot, op.const(0, INT64)), expert, axis=1), one)  # (A, 1)
    tokens = op("Shape", x2, start=0, end=1)  # (1,) = T
    token_ids = op("Range", op.const(0, INT64), op("Squeeze", tokens, op.const([0], INT64)), op.const(1, INT64))
    owner = token_ids if k == 1 else op("Tile", token_ids, op.const([k], INT64))  # (A,): a's token, a mod T
    if spec.dropless:
        # C = the busiest expert's assignment count, as dispatch() sizes it: every slot index is then
        # below E*C and distinct, so nothing drops and no keep mask is needed. (C = T would also hold
        # every assignment, since a token's k choices are distinct experts, but it runs the experts on
        # E*T rows, E/k times the work.)
        cap = op("ReduceMax", op("ReduceSum", onehot, op.const([0], INT64), keepdims=0), keepdims=1)  # (1,)
        dest = op("Add", op("Mul", expert, cap), slot)  # (A, 1) row of (E*C, d)
        slots = op("Mul", op.const([num_experts], INT64), cap)  # (1,) = E*C
        slot_token = op("ScatterND", op("Expand", tokens, slots), dest, owner)  # empty slots keep T, a zero row
        keep, row = None, dest
    else:
        cap = capacity(op, spec, tokens)
        keep = op("Less", slot, cap)  # (A, 1)
        dest = op("Add", op("Mul", expert, cap), slot)  # (A, 1) row of (E*C, d)
        assignments = tokens if k == 1 else op("Mul", tokens, op.const([k], INT64))  # (1,) = A
        assignment_ids = token_ids if k == 1 else op(
            "Range", op.const(0, INT64), op("Squeeze", assignments, op.const([0], INT64)), op.const(1, INT64))
        slots = op("Mul", op.const([num_experts], INT64), cap)  # (1,) = E*C
        # Which token fills each slot. Dropped assignments write past E*C, one row each, so that no two
        # writes share an index (ScatterND leaves duplicates undefined); empty slots keep T, a zero row.
        spill = op("Add", slots, op("Unsqueeze", assignment_ids, one))
        filled = op("ScatterND", op("Expand", tokens, op("Add", slots, assignments)),
                    op("Where", keep, dest, spill), owner)
        slot_token = op("Slice", filled, op.const([0], INT64), slots)  # (E*C,)
        row = op("Where", keep, dest, op.const([0], INT64))  # dropped: any row, zeroed below
    padded = op("Concat", x2, op.const([[0.0] * spec.d_model], spec.dtype), axis=0)  # (T + 1, d)
    xb = op("Reshape", op("Gather", padded, slot_token, axis=0), op.const([num_experts, -1, spec.d_model], INT64))
    yb = op("Reshape", experts(op, spec, xb, w), op.const([-1, spec.d_model], INT64))  # (E*C, d)
    back = op("Gather", yb, op("Squeeze", row, one), axis=0)  # (A, d)
    gate = gate if spec.router_dtype == spec.dtype else op("Cast", gate, to=spec.dtype)
    y = op("Mul", back, gate)
    if keep is not None:
        y = op("Where", keep, y, op.const([0.0], spec.dtype))  # dropped assignments: exactly 0
    if k > 1:  # choice-major rows: (k, T, d), and a token sums its kept choices
        y = op("ReduceSum", op("Reshape", y, op.const([k, -1, spec.d_model], INT64)), op.const([0], INT64),
               keepdims=0)
    return op("Reshape", y, shape)
