"""Stacked expert FFNs, computed one contiguous token group per expert by the configured kernel."""
from __future__ import annotations

import math

import torch
from torch import nn

from moeify.layers.kernels import Counts, Kernel, get_kernel, one_expert_linear
from moeify.layers.router import truncated_normal_


class Experts(nn.Module):
    """E expert FFNs as stacked parameters in nn.Linear layout.

    w_in: (E, d_ff, d_model), w_gate: (E, d_ff, d_model) for gated FFNs,
    w_out: (E, d_model, d_ff); biases b_in/b_gate (E, d_ff) and b_out (E, d_model) when
    the dense FFN had them. Gated FFNs compute act(x @ w_gate.T) * (x @ w_in.T). Built anywhere
    but on meta, the weights start with the paper's init (reset_parameters()).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: nn.Module, *,
                 gated: bool = False, bias: bool = False, out_bias: bool | None = None,
                 dropout: float = 0.0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff, self.gated = num_experts, d_model, d_ff, gated
        out_bias = bias if out_bias is None else out_bias
        kw = dict(dtype=dtype, device=device)
        self.w_in = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **kw))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_ff, d_model, **kw)) if gated else None
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **kw))
        self.b_in = nn.Parameter(torch.empty(num_experts, d_ff, **kw)) if bias else None
        self.b_gate = nn.Parameter(torch.empty(num_experts, d_ff, **kw)) if gated and bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, d_model, **kw)) if out_bias else None
        self.act = activation
        self.dropout = nn.Dropout(dropout)
        if not self.w_in.is_meta:  # usable as built, as nn.Linear is; meta stays free (conversions build there)
            self.reset_parameters()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"gated={self.gated}, bias={self.b_in is not None}")

    def reset_parameters(self, scale: float = 0.1, generator: torch.Generator | None = None) -> None:
        """Paper init for every weight: truncated normal, std = sqrt(scale / fan_in); zero biases."""
        for w in (self.w_in, self.w_gate, self.w_out):
            if w is not None:
                truncated_normal_(w, math.sqrt(scale / w.shape[-1]), generator)
        for b in (self.b_in, self.b_gate, self.b_out):
            if b is not None and not b.is_meta:
                nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, counts: Counts, kernel: str | Kernel = "auto",
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, d_model), rows grouped by expert with counts[e] rows for expert e (a list, or an (E,) tensor
        on x's device); `kernel` computes the grouped GEMMs (moeify.layers.kernels). `rows`: run the experts on
        x.index_select(0, rows) instead, gathered together with the kernel's own padding."""
        assert len(counts) == self.num_experts, f"{len(counts)} counts for {self.num_experts} experts"
        layout = get_kernel(kernel, x.device).layout(counts, self.w_in)  # pad once, unpad once
        if layout.dense:
            return self._dense(x if rows is None else x.index_select(0, rows))
        x = layout.pad(x.to(self.w_in.dtype), rows)  # (R, d_model)
        h = layout.linear(x, self.w_in, self.b_in)  # (R, d_ff)
        if self.gated:
            h = self.dropout(self.act(layout.linear(x, self.w_gate, self.b_gate)) * h)
        elif type(self.act) is nn.ReLU:
            # The kernel's own ReLU and dropout: in place and in one pass where it can (their backward needs only the
            # result). self.dropout holds the rate and follows train() / eval().
            h = layout.relu(h, self.dropout.p if self.dropout.training else 0.0)
        else:
            h = self.dropout(self.act(h))
        return layout.unpad(layout.linear(h, self.w_out, self.b_out))  # (N, d_model)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """One expert taking every row as the dense FFN computes it, with torch's own ops and nothing between them:
        F.linear on the weights' views, ReLU in place, dropout. Not the layout's ReLU: in bfloat16 that is the native
        loops' behind a Python autograd node, whose cost at a dense-sized hidden outweighs their faster pass (E 1 / 64
        tokens, interleaved: the training step 1.21x dense against 1.25x; the forward as before)."""
        w_in = self.w_in
        if x.dtype != w_in.dtype:
            x = x.to(w_in.dtype)
        h = one_expert_linear(x, w_in, self.b_in)  # (N, d_ff)
        if self.gated:
            h = self.act(one_expert_linear(x, self.w_gate, self.b_gate)) * h
        else:
            h = torch.relu_(h) if type(self.act) is nn.ReLU else self.act(h)
        dropout = self.dropout
        if dropout.training and dropout.p:
            h = dropout(h)
        return one_expert_linear(h, self.w_out, self.b_out)  # (N, d_model)
