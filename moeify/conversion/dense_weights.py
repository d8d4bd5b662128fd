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
    """The weights of `site`, read from its region's modules (`modules`: the region's named_modules).

    A fused gate-and-input Linear (site.halves) gives both as row halves of its weight, so every
    expert gets split w_gate and w_in like any gated FFN.
    """
    def view(target: str | None):
        return (None, None) if target is None else (lambda v: (v.weight, v.bias))(linear_view(modules[target]))

    (w_in, b_in), (w_gate, b_gate), (w_out, b_out) = view(site.w_in), view(site.w_gate), view(site.w_out)
    if site.halves is not None:
        gate, inp = (slice(h * site.d_ff, (h + 1) * site.d_ff) for h in site.halves)
        w_gate, w_in = w_in[gate], w_in[inp]
        b_gate, b_in = (None, None) if b_in is None else (b_in[gate], b_in[inp])
    return DenseFFN(w_in, b_in, w_gate, b_gate, w_out, b_out)
