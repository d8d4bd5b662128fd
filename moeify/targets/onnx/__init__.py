"""ONNX target: export a moeify model for onnxruntime, portable (standard ops) or fused (com.microsoft.MoE)."""
from .export import ExportReport, GraphReport, export_onnx
from .options import OnnxOptions
from .runtime import session

__all__ = ["ExportReport", "GraphReport", "OnnxOptions", "export_onnx", "session"]
