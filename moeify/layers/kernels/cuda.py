"""The CUDA kernel: one torch.nn.functional.grouped_mm per linear, offsets on the device, no host synchronisation.

It runs anywhere grouped_mm does (CPU too, which is how its logic is tested here). grouped_mm wants every
stride a multiple of 16 bytes; a layer whose widths are not (tiny test models) takes the reference loop. On CUDA its
fused kernel takes bfloat16 only: for float16 and float32 torch's recent releases copy the offsets to the host and
loop over the experts (aten/src/ATen/native/GroupedMMUtils.h), and older ones refuse them, so on CUDA those dtypes
take the reference loop, which does the same; only bfloat16 runs without a wait.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moeify.layers.kernels import Counts, one_expert_linear, router_logits
from moeify.layers.kernels.reference import ReferenceLayout

ALIGN_BYTES = 16


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's backward refuses the expanded,
    zero-stride ones that a .sum() produces."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional.grouped_mm, or torch._grouped_mm where a torch release has not made it public yet."""
    return getattr(F, "grouped_mm", torch._grouped_mm)(a, b, offs=offsets)


def aligned(weight: torch.Tensor) -> bool:
    """Whether rows of the input (in) and of the output (out) of weight (E, out, in) are whole 16-byte units."""
    return all(n * weight.element_size() % ALIGN_BYTES == 0 for n in weight.shape[1:])


class CudaLayout:
    dense = False

    def __init__(self, counts: Counts, device: torch.device) -> None:
        self.counts, self.device = counts, device

    @functools.cached_property
    def offsets(self) -> torch.Tensor:
        """(E,) int32 end row of each expert. Made on first use: one expert needs none, and a list of counts is
        uploaded, which waits for the GPU (a device tensor stays put)."""
        return torch.cumsum(torch.as_tensor(self.counts, device=self.device), 0, dtype=torch.int32)

    def pad(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return x.contiguous() if rows is None else x.index_select(0, rows)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        return y

    relu = ReferenceLayout.relu  # out of place: linear()'s output is _ContiguousGrad's view, not to be overwritten

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if weight.shape[0] == 1:  # every row is the one expert's (a static plan's dropped rows too): the dense GEMM
            return one_expert_linear(x, weight, bias)
        if not aligned(weight) or (x.is_cuda and x.dtype != torch.bfloat16):
            counts = self.counts if isinstance(self.counts, list) else self.counts.tolist()
            return ReferenceLayout(counts).linear(x, weight, bias)
        # weight (E, out, in) read as (E, in, out): a transposed view, no copy.
        y = _ContiguousGrad.apply(grouped_mm(x, weight.transpose(1, 2), self.offsets))
        if bias is not None:
            # Each row's expert, found on the device: the rows before offsets[e] belong to experts <= e.
            rows = torch.arange(x.shape[0], device=x.device, dtype=torch.int32)
            expert = torch.searchsorted(self.offsets, rows, right=True)
            y = y + bias.index_select(0, expert)
        return y


class CudaKernel:
    name = "cuda"
    pool = False
    router_logits = staticmethod(router_logits)

    def layout(self, counts: Counts, weight: torch.Tensor) -> CudaLayout:
        return CudaLayout(counts, weight.device)
