"""Which fx nodes are elementwise FFN activations, and how to rebuild them as modules."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

# Module activations recognised by type. Everything in transformers.activations is elementwise.
ACTIVATION_MODULES: tuple[type, ...] = (nn.ReLU, nn.GELU, nn.SiLU, nn.Mish, nn.ReLU6, nn.LeakyReLU)
ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.gelu, F.silu, F.mish, F.relu6, F.leaky_relu}
ACTIVATION_METHODS = {"relu"}  # x.relu(), seen in hand-written MLPs


class FunctionalActivation(nn.Module):
    """An activation the model called as a function (F.gelu(x, approximate="tanh"))."""

    def __init__(self, fn, kwargs: dict | None = None) -> None:
        super().__init__()
        self.fn, self.kwargs = fn, dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **self.kwargs)

    def extra_repr(self) -> str:
        kw = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"{getattr(self.fn, '__name__', self.fn)}{kw}"


def _is_transformers_activation(m: nn.Module) -> bool:
    return type(m).__module__ == "transformers.activations"


def activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """A module computing `node`'s activation on its first input, or None if it is not one."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, ACTIVATION_MODULES) or _is_transformers_activation(m):
            return copy.deepcopy(m)
    elif node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS and len(node.args) == 1:
        return FunctionalActivation(node.target, node.kwargs)
    elif node.op == "call_method" and node.target in ACTIVATION_METHODS and len(node.args) == 1:
        return FunctionalActivation(getattr(torch, node.target), node.kwargs)
    return None


def dropout_rate(node: fx.Node, modules: dict[str, nn.Module]) -> float | None:
    """The rate if `node` is a dropout (module or F.dropout), else None."""
    if node.op == "call_module" and isinstance(modules[node.target], nn.Dropout):
        return float(modules[node.target].p)
    if node.op == "call_function" and node.target is F.dropout:
        return float(node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5))
    return None
