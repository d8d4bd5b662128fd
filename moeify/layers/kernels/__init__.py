"""Grouped expert GEMMs behind one interface, by backend: rows grouped by expert times each expert's weight."""
from __future__ import annotations

import functools
from typing import Protocol, Sequence

import torch

from moeify.config import KERNELS
from moeify.errors import MoeifyError

Counts = Sequence[int] | torch.Tensor  # rows per expert: a host list, or an (E,) tensor on the rows' device


class Layout(Protocol):
    """One grouping of rows, reused for every linear of an expert FFN: pad once, linear(s), unpad once; relu() of a
    linear's output, then dropout with probability `dropout` when it is not 0 (where a layout can, in place and in
    one pass: a fresh activation the size of the FFN's hidden costs page faults). pad(x, rows) lays out
    x.index_select(0, rows), in one gather where the layout moves rows anyway. `dense`: one expert whose linears are
    the dense FFN's own F.linear (one_expert_linear) and whose pad and unpad move no row, so a caller may run those
    itself."""

    dense: bool

    def pad(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def unpad(self, y: torch.Tensor) -> torch.Tensor: ...

    def relu(self, h: torch.Tensor, dropout: float = 0.0) -> torch.Tensor: ...


class Kernel(Protocol):
    name: str
    pool: bool  # whether its large buffers (and the combine's) come from moeify.layers.memory's recycled ones

    def layout(self, counts: Counts, weight: torch.Tensor) -> Layout:
        """The layout of rows with counts[e] for expert e, for GEMMs with experts' weights like `weight`, (E, out, in):
        its device, its dtype (the activations' too) and its size."""

    def router_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The router's logits x @ weight.T, (T, E), in the weight's dtype, x widened to it (the router's precision)."""


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Every kernel's router logits but the cpu kernel's fast path: F.linear on x widened to the weight's dtype."""
    return torch.nn.functional.linear(x.to(weight.dtype), weight)


def get_kernel(kernel: str | Kernel, device: torch.device) -> Kernel:
    """The backend `kernel` names (an instance is used as it is: tests and benchmarks pass tuned ones)."""
    if not isinstance(kernel, str):
        return kernel
    if kernel == "auto":
        kernel = "cuda" if device.type == "cuda" else "cpu"
    return _named(kernel)


@functools.cache
def _named(kernel: str) -> Kernel:
    """One instance per backend (they hold no state), made once: every layer's forward asks for its kernel."""
    if kernel == "reference":
        from moeify.layers.kernels.reference import ReferenceKernel

        return ReferenceKernel()
    if kernel == "cpu":
        from moeify.layers.kernels.cpu import CpuKernel

        return CpuKernel()
    if kernel == "cuda":
        from moeify.layers.kernels.cuda import CudaKernel

        return CudaKernel()
    raise MoeifyError(f"kernel {kernel!r} is not one of {', '.join(KERNELS)}")


def one_expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight[0].T + bias[0] for a layer of one expert: the dense FFN's own F.linear, on views of weight (1, out,
    in) and bias (1, out) whose gradients are views back (a kernel's grouped path would add its own Python)."""
    return torch.nn.functional.linear(x, weight.squeeze(0), None if bias is None else bias.squeeze(0))


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors. Where it does not (inference, torch.no_grad), a kernel runs
    its custom autograd Function's forward as a plain function: the node's Python cost an E = 1 / 64-token float32
    forward 3-6 % (docs/performance.md)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def host_counts(counts: Counts) -> list[int]:
    """Counts as a Python list: free for a list, a device sync for a CUDA tensor (host-planned kernels only)."""
    return counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: Counts,
                   kernel: str | Kernel = "auto") -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ weight[e].T + bias[e]: x (N, in) holds counts[e] consecutive rows of expert e,
    weight is (E, out, in) (nn.Linear layout), bias (E, out) or None. Returns (N, out)."""
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    layout = get_kernel(kernel, x.device).layout(counts, weight)
    return layout.unpad(layout.linear(layout.pad(x), weight, bias))
