"""The proof at export time: run the exported graph and PyTorch on a fresh batch and compare."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from moeify.layers.switch import switch_layers
from moeify.targets.onnx.graphs import Graph, outputs

# Another batch and sequence length than the trace's (2, 7): the dynamic axes get exercised.
CHECK_BATCH, CHECK_SEQUENCE = 3, 11


@contextlib.contextmanager
def dropless(model: nn.Module, names: set[str]) -> Iterator[None]:
    """Make the named layers dropless: the fused kernel never drops a token."""
    saved = {}
    try:
        for name, layer in switch_layers(model).items():
            if name in names:
                saved[name] = layer.routing
                layer.routing = dataclasses.replace(layer.routing, dropless=True)
        yield
    finally:
        for name, layer in switch_layers(model).items():
            if name in saved:
                layer.routing = saved[name]


@contextlib.contextmanager
def dequantized(model: nn.Module, quantized: dict) -> Iterator[None]:
    """Give the named layers the dequantized expert weights their QMoE nodes compute with
    (`quantized`: layer name -> qmoe.QuantizedExperts), so that the check compares like with like."""
    saved = []
    try:
        for name, layer in switch_layers(model).items():
            if name in quantized:
                for attr in ("w_in", "w_gate", "w_out"):
                    q, param = getattr(quantized[name], attr), getattr(layer.experts, attr)
                    if q is not None:
                        saved.append((param, param.data))
                        param.data = q.dequantized().to(param.dtype)
        yield
    finally:
        for param, data in saved:
            param.data = data


def feed(session: ort.InferenceSession, inputs: tuple[torch.Tensor, ...],
         names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Inputs as the session wants them (fp16 graphs take fp16 hidden states); by name where `names`
    are given, else in the session's order."""
    types = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64}
    wanted = {i.name: i.type for i in session.get_inputs()}
    names = names or list(wanted)
    return {n: t.numpy().astype(types.get(wanted[n], t.numpy().dtype)) for n, t in zip(names, inputs) if n in wanted}


def max_abs_diff(graph: Graph, model: nn.Module, session: ort.InferenceSession, dropless_layers: set[str]) -> float:
    """max |onnxruntime - PyTorch eval| over every output on one batch; `graph` must compute with `model`."""
    inputs = graph.sample(CHECK_BATCH, CHECK_SEQUENCE, 1)
    was_training = model.training
    model.eval()
    with dropless(model, dropless_layers):
        expected = outputs(graph, inputs)
    model.train(was_training)
    got = session.run(graph.output_names, feed(session, inputs, graph.input_names))
    return max(float(np.abs(g.astype(np.float32) - e.float().numpy()).max()) for g, e in zip(got, expected))
