"""The gated combine: expert output rows times their gates, back into token order."""
from __future__ import annotations

import torch

from moeify.layers import memory
from moeify.layers.kernels import records_grad


def _pooled_combine(y: torch.Tensor, gate: torch.Tensor, token_index: torch.Tensor | None, num_tokens: int,
                    accumulate: bool) -> torch.Tensor:
    """_PooledGatedCombine's forward without its autograd node."""
    if token_index is not None and not accumulate:
        return _gathered_combine(y, gate, token_index, num_tokens)
    gated = torch.mul(y, gate.unsqueeze(-1), out=memory.gradient_buffer(y)[0])
    if token_index is None:
        return gated
    out, is_zero = memory.empty((num_tokens, y.shape[-1]), y.dtype, y.device)
    if not is_zero:
        out.zero_()  # tokens with no kept choice stay exactly zero: the residual carries them
    return out.index_add_(0, token_index, gated)


def _gathered_combine(y: torch.Tensor, gate: torch.Tensor, token_index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Each token's one row of y times its gate, in token order, as a gather from y and a multiply in place; the
    tokens with no kept row exactly zero. The same products as zeros, a multiply and index_copy_ into token order (the
    same bits), in two passes over (T, d) instead of three: (8,192, 512) bfloat16 0.96 ms against 1.64, float32 1.24
    against 2.12 (sixteenth session)."""
    kept = token_index.shape[0]
    row = torch.zeros(num_tokens, dtype=torch.long, device=y.device)  # each token's row of y (dropped ones: row 0)
    row.index_copy_(0, token_index, torch.arange(kept, device=y.device))
    token_gate = torch.zeros(num_tokens, dtype=gate.dtype, device=y.device).index_copy_(0, token_index, gate)
    out = memory.empty((num_tokens, y.shape[-1]), y.dtype, y.device)[0]
    torch.index_select(y, 0, row, out=out).mul_(token_gate.unsqueeze(-1))
    if kept < num_tokens:  # zeros written over the dropped tokens' rows (0 times an infinite row of y is not zero)
        dropped = torch.ones(num_tokens, dtype=torch.bool, device=y.device).index_fill_(0, token_index, False)
        out.index_fill_(0, dropped.nonzero().squeeze(1), 0)
    return out


class _PooledGatedCombine(torch.autograd.Function):
    """gated_combine's arithmetic as one autograd node whose (rows, d) temporaries, forward and backward, come from
    memory.empty's recycled buffers. As separate ops an E 8 / 8,192-token float32 training step made four fresh 16 MB
    tensors here, and their page faults made its three multiplies 8.3 ms against transformers' 3.3 for the same
    three (docs/performance.md). Same ops in the same order and dtype as the plain path: the same bits."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, gate: torch.Tensor, token_index: torch.Tensor | None, num_tokens: int,
                accumulate: bool) -> torch.Tensor:
        ctx.save_for_backward(y, gate, token_index)
        return _pooled_combine(y, gate, token_index, num_tokens, accumulate)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        y, gate, token_index = ctx.saved_tensors
        # d out / d gated, in y's row order: autograd's own tensor (left unchanged) or a gather of it.
        rows = grad_out if token_index is None else torch.index_select(grad_out, 0, token_index,
                                                                        out=memory.gradient_buffer(y)[0])
        grad_gate = torch.mul(rows, y, out=memory.gradient_buffer(y)[0]).sum(-1) if ctx.needs_input_grad[1] else None
        grad_y = None
        if ctx.needs_input_grad[0]:
            gate = gate.unsqueeze(-1)
            grad_y = torch.mul(rows, gate, out=memory.gradient_buffer(y)[0]) if token_index is None else rows.mul_(gate)
        return grad_y, grad_gate, None, None, None


def gated_combine(y: torch.Tensor, gate: torch.Tensor, token_index: torch.Tensor | None, num_tokens: int, *,
                  accumulate: bool = False, pool: bool = False) -> torch.Tensor:
    """(num_tokens, d): each row y[a] (an expert's output, (K, d) in all) times gate[a] (K,), copied (accumulate:
    added) to row token_index[a] of zeros; with token_index None, y * gate itself (K = num_tokens). `pool`: the
    kernel takes its large buffers from memory's recycled ones, and so does this where they are large."""
    if pool and memory.pools(tuple(y.shape), y.dtype, y.device):
        if records_grad(y, gate):
            return _PooledGatedCombine.apply(y, gate, token_index, num_tokens, accumulate)
        return _pooled_combine(y, gate, token_index, num_tokens, accumulate)
    # Plain ops where no buffer would be pooled: a custom node's Python cost an E 1 / 64-token step 2-3 %.
    gated = y * gate.unsqueeze(-1)
    if token_index is None:
        return gated
    out = y.new_zeros(num_tokens, y.shape[-1])  # in place on fresh zeros: out-of-place forms copy it first
    return out.index_add_(0, token_index, gated) if accumulate else out.index_copy_(0, token_index, gated)
