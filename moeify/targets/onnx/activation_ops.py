"""Recognise an expert's activation by what it computes, and write it with standard ONNX ops."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeify.errors import MoeifyError
from moeify.targets.onnx.emit import Emit


@dataclass(frozen=True)
class Activation:
    name: str
    reference: Callable[[torch.Tensor], torch.Tensor]
    lower: Callable[[Emit, Any, int], Any]  # (op, x, dtype) -> act(x), standard ops only
    fused: str | None  # com.microsoft.MoE activation_type computing the same function on CPU, if any


def _half_x_times(op: Emit, x: Any, inner: Any, dtype: int) -> Any:
    """0.5 * x * (1 + inner), the shape of both GELU forms."""
    return op("Mul", op("Mul", x, op.const(0.5, dtype)), op("Add", op.const(1.0, dtype), inner))


def _gelu(op: Emit, x: Any, dtype: int) -> Any:
    return _half_x_times(op, x, op("Erf", op("Mul", x, op.const(1 / math.sqrt(2), dtype))), dtype)


def _gelu_tanh(op: Emit, x: Any, dtype: int) -> Any:
    cube = op("Mul", op("Mul", x, x), x)
    inner = op("Add", x, op("Mul", cube, op.const(0.044715, dtype)))
    return _half_x_times(op, x, op("Tanh", op("Mul", inner, op.const(math.sqrt(2 / math.pi), dtype))), dtype)


def _sigmoid_times(scale: float) -> Callable[[Emit, Any, int], Any]:
    def lower(op: Emit, x: Any, dtype: int) -> Any:
        z = x if scale == 1.0 else op("Mul", x, op.const(scale, dtype))
        return op("Mul", x, op("Sigmoid", z))
    return lower


# The onnxruntime CPU kernel's "gelu" is the tanh approximation (measured: it matches
# F.gelu(approximate="tanh") to 1e-7 and misses the erf form by 3e-4), so only that one fuses.
KNOWN = (
    Activation("relu", F.relu, lambda op, x, dtype: op("Relu", x), "relu"),
    Activation("gelu", F.gelu, _gelu, None),
    Activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh, "gelu"),
    Activation("silu", F.silu, _sigmoid_times(1.0), "silu"),
    Activation("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x), _sigmoid_times(1.702), None),
    Activation("relu6", F.relu6, lambda op, x, dtype: op("Clip", x, op.const(0.0, dtype), op.const(6.0, dtype)), None),
    Activation("mish", F.mish, lambda op, x, dtype: op("Mul", x, op("Tanh", op("Softplus", x))), None),
    Activation("identity", lambda x: x, lambda op, x, dtype: x, "identity"),
)


def identify(act: nn.Module) -> Activation:
    """The known activation that `act` computes: probed on a grid, whatever its class is called."""
    x = torch.linspace(-8.0, 8.0, 2001, dtype=torch.float64)
    with torch.no_grad():
        try:
            y = act(x)
        except RuntimeError:  # some modules only run in float32
            y = act(x.float()).double()
        for candidate in KNOWN:
            if torch.allclose(y, candidate.reference(x), rtol=0, atol=1e-5):
                return candidate
    raise MoeifyError(f"cannot lower the expert activation {act!r} to ONNX: moeify knows "
                      f"{', '.join(a.name for a in KNOWN)}")
