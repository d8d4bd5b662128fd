"""DenseFFN: a matched FFN's weights in nn.Linear layout (views, never copies), what every expert init reads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeify.conversion.find_ffn import FFNSite
from moeify.conversion.regions import linear_view


@dataclass(frozen=True)
class DenseFFN:
    """out = w_out @ act(w_in @ x + b_in) + b_out, or w_out @ (act(w_gate @ x + b_gate) * (w_in @ x + b_in)) + b_out."""

    w_in: torch.Tensor  # (d_ff, d_model)
    b_in: torch.Tensor | None  # (d_ff,)
    w_gate: torch.Tensor | None  # (d_ff, d_model), gated FFNs only
    b_gate: torch.Tensor | None
    w_out: torch.Tensor  # (d_model, d_ff)
    b_out: torch.Tensor | None  # (d_model,)


def dense_ffn(site: FFNSite, modules: dict[str, nn.Module]) -> DenseFFN:
    """The weights of `site`, read from its region's modules (`modules`: the region's named_modules)."""
    def view(target: str | None):
        return (None, None) if target is None else (lambda v: (v.weight, v.bias))(linear_view(modules[target]))

    (w_in, b_in), (w_gate, b_gate), (w_out, b_out) = view(site.w_in), view(site.w_gate), view(site.w_out)
    return DenseFFN(w_in, b_in, w_gate, b_gate, w_out, b_out)
