"""Capture: trace candidate FFN regions of a model with torch.fx, keeping submodules as leaves (or inlined)."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator, NamedTuple

import torch
from torch import fx, nn

from moeify.conversion.tracing import RegionTracer, trace_module


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


@dataclass
class Region:
    """A module traced on its own. graph_module is None when tracing failed (see error)."""

    name: str  # qualified name in the model
    module: nn.Module
    graph_module: fx.GraphModule | None
    error: str | None = None
    inlined: tuple[str, ...] = ()  # children traced through rather than kept as leaves

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def _holds_one_linear(module: nn.Module) -> bool:
    """A small child such as BertIntermediate or BertOutput: one linear-like module, its own direct child."""
    if linear_view(module) is not None:
        return False
    linears = list(islice((m for m in module.modules() if linear_view(m) is not None), 2))
    return len(linears) == 1 and any(c is linears[0] for c in module.children())


def _traces_alone(module: nn.Module) -> bool:
    try:
        RegionTracer().trace(module)
    except Exception:  # fx raises many types; such a child stays a leaf
        return False
    return True


def candidate_regions(model: nn.Module) -> Iterator[tuple[str, nn.Module, frozenset[str]]]:
    """Where an FFN's dataflow lives: modules whose direct children hold two linear-like modules, each
    a child itself or the one linear of a small child that traces alone (BertLayer: intermediate.dense,
    output.dense). Yields the name, the module and the small children to trace through."""
    for name, module in model.named_modules():
        direct = sum(linear_view(c) is not None for c in module.children())
        small = [(n, c) for n, c in module.named_children() if _holds_one_linear(c)]
        if direct + len(small) < 2:
            continue
        inline = frozenset(n for n, c in small if _traces_alone(c))
        if direct + len(inline) >= 2:
            yield name, module, inline


def trace_region(name: str, module: nn.Module, inline: frozenset[str] = frozenset()) -> Region:
    try:
        gm = trace_module(module, inline, where=name or "<root>")
    except Exception as e:  # fx raises many types; the reason is what users need
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return Region(name, module, None, reason, tuple(sorted(inline)))
    return Region(name, module, gm, inlined=tuple(sorted(inline)))


def capture(model: nn.Module) -> list[Region]:
    """Trace every candidate region of `model`, in module order."""
    return [trace_region(name, module, inline) for name, module, inline in candidate_regions(model)]
