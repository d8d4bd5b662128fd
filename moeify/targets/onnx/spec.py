"""LayerSpec: the ONNX lowering's view of a Switch layer: its SwitchLayerRecord plus ONNX types."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from moeify.checkpoint.summary import layer_record
from moeify.errors import MoeifyError, opt
from moeify.layers.switch import SwitchFFN
from moeify.targets.onnx.activation_ops import Activation, identify
from moeify.targets.onnx.emit import ONNX_DTYPES


@dataclass(frozen=True)
class LayerSpec:
    name: str
    num_experts: int
    d_model: int
    d_ff: int
    eval_capacity_factor: float
    min_capacity: int
    top_k: int  # experts per token
    normalize_gates: bool  # the k kept probabilities divided by their sum
    dropless: bool  # no capacity: every (token, choice) reaches its expert
    activation: Activation
    gated: bool
    dtype: int  # ONNX element type of hidden states and expert weights
    router_dtype: int  # ONNX element type the router computes in (float32 unless configured)

    @classmethod
    def of(cls, name: str, layer: SwitchFFN) -> "LayerSpec":
        e, record = layer.experts, layer_record(name, layer)
        if e.w_in.dtype not in ONNX_DTYPES:
            raise MoeifyError(f"{name or 'the model'} holds {e.w_in.dtype} experts: moeify exports float32 "
                              "and float16 models; call model.float() first (--dtype fp16 halves it for you)")
        r = record.routing
        if layer.router.router_dtype not in ONNX_DTYPES:
            raise MoeifyError(f"{name or 'the model'} routes in {r.router_dtype}, which the ONNX export does not "
                              f"write: convert again with {opt('router_dtype', 'float32')}")
        return cls(name, record.num_experts, record.d_model, record.d_ff, r.eval_capacity_factor, r.min_capacity,
                   r.top_k, r.normalize_gates, r.dropless, identify(e.act), record.gated,
                   ONNX_DTYPES[e.w_in.dtype], ONNX_DTYPES[layer.router.router_dtype])


class Weights(NamedTuple):
    """Graph values of one layer's parameters; None where the layer has no such tensor."""

    router: Any  # (E, d_model)
    w_in: Any  # (E, d_ff, d_model)
    w_gate: Any  # (E, d_ff, d_model) or None
    w_out: Any  # (E, d_model, d_ff)
    b_in: Any  # (E, d_ff) or None
    b_gate: Any  # (E, d_ff) or None
    b_out: Any  # (E, d_model) or None

    @classmethod
    def of(cls, layer: SwitchFFN) -> "Weights":
        e = layer.experts
        return cls(layer.router.weight, e.w_in, e.w_gate, e.w_out, e.b_in, e.b_gate, e.b_out)
