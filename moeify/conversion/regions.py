"""Capture: trace candidate FFN regions of a model with torch.fx, keeping submodules as leaves."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
from torch import fx, nn


class LinearView(NamedTuple):
    """A linear-like module seen in nn.Linear layout."""

    weight: torch.Tensor  # (out_features, in_features)
    bias: torch.Tensor | None  # (out_features,)
    in_features: int
    out_features: int


def _view_linear(m: nn.Linear) -> LinearView:
    return LinearView(m.weight, m.bias, m.in_features, m.out_features)


def _view_conv1d(m: nn.Module) -> LinearView:
    # transformers' Conv1D (GPT-2) is a linear layer that stores its weight as (in, out).
    w = m.weight.t()
    return LinearView(w, m.bias, w.shape[1], w.shape[0])


def _linear_types() -> dict[type, Callable[[nn.Module], LinearView]]:
    types: dict[type, Callable[[nn.Module], LinearView]] = {nn.Linear: _view_linear}
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    else:
        types[Conv1D] = _view_conv1d
    return types


LINEAR_TYPES = _linear_types()


def linear_view(m: nn.Module) -> LinearView | None:
    """The module as a linear layer, or None when it is not linear-like."""
    for t, view in LINEAR_TYPES.items():
        if type(m) is t:
            return view(m)
    return None


class RegionTracer(fx.Tracer):
    """Traces only the region's own forward: every submodule stays a call_module leaf.

    Whole transformers models and their attention modules do not trace, and norms such as
    T5LayerNorm branch on dtype; an FFN container's own forward is plain dataflow.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


@dataclass
class Region:
    """A module traced on its own. graph_module is None when tracing failed (see error)."""

    name: str  # qualified name in the model
    module: nn.Module
    graph_module: fx.GraphModule | None
    error: str | None = None

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def candidate_regions(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules with at least two direct linear-like children: where an FFN's dataflow lives."""
    for name, module in model.named_modules():
        linears = [c for c in module.children() if linear_view(c) is not None]
        if len(linears) >= 2:
            yield name, module


def trace_region(name: str, module: nn.Module) -> Region:
    try:
        graph = RegionTracer().trace(module)
    except Exception as e:  # fx raises many types; the reason is what users need
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return Region(name, module, None, reason)
    gm = fx.GraphModule(module, graph, type(module).__name__)
    gm.graph.eliminate_dead_code()  # e.g. unused parameter reads left by dtype checks
    gm.recompile()
    return Region(name, module, gm)


def capture(model: nn.Module) -> list[Region]:
    """Trace every candidate region of `model`, in module order."""
    return [trace_region(name, module) for name, module in candidate_regions(model)]
