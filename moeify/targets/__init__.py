"""Targets: what a converted model is lowered to (distributed/ for torch.distributed, onnx/ for onnxruntime)."""
