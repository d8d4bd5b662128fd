"""OnnxOptions: how to export (mode, opset, dtype, provider, optimisation), validated on creation."""
from __future__ import annotations

from dataclasses import dataclass

from moeify.errors import MoeifyError

MODES = ("fused", "portable")
DTYPES = ("fp32", "fp16")
PROVIDERS = ("cpu", "cuda")
QUANTIZE = ("int8", "int4")  # weight-only, com.microsoft.QMoE (qmoe.py)
# The TorchScript exporter writes opsets 17-20; the dynamo exporter (onnxscript) 18 and later.
LEGACY_OPSETS = range(17, 21)
DYNAMO_OPSETS = range(18, 24)


@dataclass(frozen=True)
class OnnxOptions:
    mode: str = "fused"  # fused: com.microsoft.MoE where it can express the FFN; portable: standard ops only
    opset: int | None = None  # None: the route's lowest (17 TorchScript, 18 dynamo)
    dtype: str = "fp32"  # fp16 keeps the router in float32 (selective precision) and casts its logits
    provider: str = "cpu"  # onnxruntime execution provider for optimisation and the parity check
    optimize: bool = True  # run onnxruntime's graph optimisations and report node counts
    save_optimized: bool = False  # also write <graph>_optimized.onnx for that provider
    dynamo: bool = False  # torch.export route (needs onnxscript); default is the TorchScript exporter
    check: bool = True  # run the exported graphs and PyTorch on a sample batch and compare (parity)
    with_past: bool = False  # transformers models: a KV cache, optimum's -with-past layouts (docs/onnx.md)
    quantize: str | None = None  # int8 / int4 expert weights in com.microsoft.QMoE; None: float

    def __post_init__(self) -> None:
        for name, allowed in (("mode", MODES), ("dtype", DTYPES), ("provider", PROVIDERS)):
            if getattr(self, name) not in allowed:
                raise MoeifyError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        opsets = DYNAMO_OPSETS if self.dynamo else LEGACY_OPSETS
        if self.opset is None:
            object.__setattr__(self, "opset", opsets.start)
        if self.opset not in opsets:
            route = "the dynamo exporter" if self.dynamo else "the TorchScript exporter"
            raise MoeifyError(f"unsupported opset {self.opset}: {route} writes opsets "
                              f"{opsets.start}-{opsets.stop - 1}; try --opset {opsets.start}")
        if self.with_past and self.dynamo:  # the cache wrappers are tested on the TorchScript route only
            raise MoeifyError("--with-past exports with the TorchScript exporter: drop --dynamo")
        if self.quantize is not None:
            if self.quantize not in QUANTIZE:
                raise MoeifyError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
            if self.mode != "fused":  # QMoE is a contrib op; portable mode promises standard ops only
                raise MoeifyError("--quantize writes com.microsoft.QMoE nodes: it needs --mode fused, not portable")
            if self.dynamo:  # tested on the TorchScript route only
                raise MoeifyError("--quantize exports with the TorchScript exporter: drop --dynamo")
        if self.save_optimized and not self.optimize:
            raise MoeifyError("--save-optimized needs --optimize")
