"""The reference kernel: a plain loop over each expert's contiguous rows, with ordinary autograd. The oracle."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moeify.layers.kernels import Counts, host_counts, router_logits


class ReferenceLayout:
    dense = False  # its linear stays the oracle's loop

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts

    def pad(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return x if rows is None else x.index_select(0, rows)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def relu(self, h: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        h = torch.relu(h)  # the oracle stays plain autograd
        return F.dropout(h, dropout, training=True) if dropout else h

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        assert sum(self.counts) == x.shape[0] and len(self.counts) == weight.shape[0]
        parts = x.split(self.counts)
        out = [F.linear(part, weight[e], None if bias is None else bias[e])
               for e, part in enumerate(parts) if len(part)]
        return torch.cat(out) if out else x.new_zeros(0, weight.shape[1])


class ReferenceKernel:
    name = "reference"
    pool = False
    router_logits = staticmethod(router_logits)

    def layout(self, counts: Counts, weight: torch.Tensor) -> ReferenceLayout:
        return ReferenceLayout(host_counts(counts))
