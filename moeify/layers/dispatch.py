"""Pure functions for top-1 capacity dispatch: which tokens each expert keeps, in what order."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Dispatch(NamedTuple):
    token_index: torch.Tensor  # (K,) kept tokens, grouped by expert, earlier tokens first
    counts: list[int]  # (E,) kept tokens per expert; sum(counts) == K
    routed: torch.Tensor  # (E,) tokens whose argmax chose each expert, before dropping


def dispatch(expert_index: torch.Tensor, num_experts: int, capacity: int) -> Dispatch:
    """Sort tokens by expert; keep the first `capacity` of each in flattened (batch, position) order."""
    num_tokens = expert_index.numel()
    # A stable sort keeps token order inside each expert, so earlier tokens win the slots.
    order = torch.argsort(expert_index, stable=True)  # (T,)
    routed = torch.bincount(expert_index, minlength=num_experts)  # (E,)
    starts = torch.cumsum(routed, 0) - routed  # (E,) first sorted slot of each expert
    slot = torch.arange(num_tokens, device=expert_index.device) - starts[expert_index[order]]  # (T,)
    token_index = order[slot < capacity]  # (K,)
    counts = routed.clamp(max=capacity).tolist()
    return Dispatch(token_index, counts, routed)
