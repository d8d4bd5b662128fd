"""Stacked expert FFNs, computed one contiguous token group per expert."""
from __future__ import annotations

import math

import torch
from torch import nn

from .memory import empty_like_hugepages
from .router import truncated_normal_


class _GroupedLinear(torch.autograd.Function):
    """y[g] = x[g] @ w[e].T + b[e] for consecutive row groups g, one per expert.

    Written by hand because plain autograd over per-expert views of a stacked weight
    makes backward materialise a full-size zero gradient per expert (O(E^2) traffic).
    Here each expert's weight gradient is written once into a single stacked buffer.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts):  # x: (N, in), weight: (E, out, in), bias: (E, out)
        y = x.new_empty(x.shape[0], weight.shape[1])  # (N, out)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                if bias is None:
                    torch.mm(x[rows], weight[e].t(), out=y[rows])
                else:
                    torch.addmm(bias[e], x[rows], weight[e].t(), out=y[rows])
                start += n
        ctx.counts = counts
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: (N, out)
        x, weight = ctx.saved_tensors
        counts = ctx.counts
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()
        grad_x = x.new_empty(x.shape) if need_x else None  # (N, in)
        grad_w = empty_like_hugepages(weight) if need_w else None  # (E, out, in)
        grad_b = weight.new_empty(weight.shape[:2]) if need_b and ctx.has_bias else None  # (E, out)
        start = 0
        for e, n in enumerate(counts):
            rows = slice(start, start + n)
            start += n
            if n == 0:
                # Only experts that received no token pay for zeroing their gradient slice.
                if grad_w is not None:
                    grad_w[e].zero_()
                if grad_b is not None:
                    grad_b[e].zero_()
                continue
            g = grad_y[rows]  # (n, out)
            if grad_x is not None:
                torch.mm(g, weight[e], out=grad_x[rows])
            if grad_w is not None:
                torch.mm(g.t(), x[rows], out=grad_w[e])
            if grad_b is not None:
                torch.sum(g, dim=0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   counts: list[int]) -> torch.Tensor:
    """Apply expert e's linear to the e-th group of `counts[e]` consecutive rows of x."""
    assert sum(counts) == x.shape[0], f"counts sum to {sum(counts)} but x has {x.shape[0]} rows"
    assert len(counts) == weight.shape[0], f"{len(counts)} counts for {weight.shape[0]} experts"
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    return _GroupedLinear.apply(x.contiguous(), weight, bias, counts)


class Experts(nn.Module):
    """E expert FFNs as stacked parameters in nn.Linear layout.

    w_in: (E, d_ff, d_model), w_gate: (E, d_ff, d_model) for gated FFNs,
    w_out: (E, d_model, d_ff); biases b_in/b_gate (E, d_ff) and b_out (E, d_model) when
    the dense FFN had them. Gated FFNs compute act(x @ w_gate.T) * (x @ w_in.T).
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

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x: (N, d_model), rows grouped by expert with counts[e] rows for expert e."""
        h = grouped_linear(x, self.w_in, self.b_in, counts)  # (N, d_ff)
        if self.gated:
            h = self.act(grouped_linear(x, self.w_gate, self.b_gate, counts)) * h  # (N, d_ff)
        else:
            h = self.act(h)
        h = self.dropout(h)
        return grouped_linear(h, self.w_out, self.b_out, counts)  # (N, d_model)
