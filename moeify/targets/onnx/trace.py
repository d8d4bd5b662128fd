"""Capture a graph with torch.onnx: the TorchScript exporter by default, torch.export on request.

Why the TorchScript route: with torch 2.13 and transformers 5.24, the dynamo exporter fails on
T5's attention in decomposition ("Cannot view a tensor with shape [s72, s53, 2, 4] and strides
(8*s53, 4, 4*s53, 1) as a tensor with shape (s72, s53, 8)"), dense T5 as well, while the
TorchScript exporter matches PyTorch to about 1e-6. It is deprecated, so the Switch lowering is
written against a small op builder (emit.py) that the dynamo route (dynamo.py) drives through
onnxscript as well. See docs/onnx.md.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from moeify.targets.onnx.graphs import Graph
from moeify.targets.onnx.options import OnnxOptions
from moeify.targets.onnx.unit import LayerLowering, export_units

CONTRIB_OPSETS = {"com.microsoft": 1}


def trace_graph(graph: Graph, model: nn.Module, plans: list[LayerLowering], options: OnnxOptions, path: Path) -> list[str]:
    """Write `graph` to `path` with each Switch layer lowered as planned; returns the layers it holds."""
    if options.dynamo:
        from moeify.targets.onnx.dynamo import capture_dynamo

        return capture_dynamo(graph, model, plans, options, path)
    graph.module.eval()  # the exporter restores the wrapper's mode, recursively: it must be eval
    args = graph.sample(2, 7, 0)
    fused = any(p.lowering == "fused" for p in plans)
    with warnings.catch_warnings(), export_units(model, plans, options.opset) as called, torch.no_grad():
        # Expected and explained in docs/onnx.md: the TorchScript exporter's deprecation notice,
        # and tracer notes about Python-side checks inside transformers.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.module, args, str(path), dynamo=False, opset_version=options.opset,
                          input_names=graph.input_names, output_names=graph.output_names,
                          dynamic_axes=graph.dynamic_axes, do_constant_folding=True,
                          training=torch.onnx.TrainingMode.EVAL,
                          custom_opsets=CONTRIB_OPSETS if fused else None)
    return list(dict.fromkeys(called))
