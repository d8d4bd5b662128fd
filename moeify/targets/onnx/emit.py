"""A small op builder the lowerings write against, so one lowering serves both torch exporters."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import onnx
import torch

_T = onnx.TensorProto
FLOAT, DOUBLE, FLOAT16, INT64, UINT8 = _T.FLOAT, _T.DOUBLE, _T.FLOAT16, _T.INT64, _T.UINT8
ONNX_DTYPES = {torch.float32: FLOAT, torch.float64: DOUBLE, torch.float16: FLOAT16}


class Emit(Protocol):
    """op("MatMul", a, b), op("Softmax", x, axis=-1), op("MoE", ..., domain="com.microsoft");
    values, indices = op("TopK", x, k, axis=-1, outputs=2) for an op with several outputs."""

    opset: int

    def __call__(self, op_type: str, *inputs: Any, domain: str = "", outputs: int = 1, **attrs: Any) -> Any: ...

    def const(self, value: Any, dtype: int) -> Any: ...

    def absent(self) -> Any:
        """An omitted optional input."""
        ...


def _suffixed(key: str, value: Any) -> str:
    """The TorchScript exporter wants typed attribute names: axis_i, alpha_f, activation_type_s."""
    first = value[0] if isinstance(value, (list, tuple)) and value else value
    if isinstance(first, (bool, int, np.integer)):
        return f"{key}_i"
    if isinstance(first, (float, np.floating)):
        return f"{key}_f"
    if isinstance(first, str):
        return f"{key}_s"
    if isinstance(first, torch.Tensor):
        return f"{key}_t"
    raise TypeError(f"attribute {key}={value!r} has no ONNX type")


class LegacyEmit:
    """Emit into a TorchScript-exporter GraphContext (the `g` of a symbolic function)."""

    def __init__(self, g, opset: int) -> None:
        self.g, self.opset = g, opset

    def __call__(self, op_type: str, *inputs: Any, domain: str = "", outputs: int = 1, **attrs: Any) -> Any:
        name = f"{domain}::{op_type}" if domain else op_type
        return self.g.op(name, *inputs, outputs=outputs, **{_suffixed(k, v): v for k, v in attrs.items()})

    def const(self, value: Any, dtype: int) -> Any:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        return self.g.op("Constant", value_t=torch.from_numpy(np.asarray(value, dtype=np_dtype)))

    def absent(self) -> Any:
        node = self.g.op("prim::Constant")
        node.setType(torch._C.OptionalType.ofTensor())
        return node
