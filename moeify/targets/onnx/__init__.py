"""ONNX target: export a moeify model for onnxruntime, portable (standard ops) or fused (com.microsoft.MoE)."""
from moeify.targets.onnx.export import ExportReport, GraphReport, export_onnx
from moeify.targets.onnx.options import OnnxOptions
from moeify.targets.onnx.session import session

__all__ = ["ExportReport", "GraphReport", "OnnxOptions", "export_onnx", "session"]
