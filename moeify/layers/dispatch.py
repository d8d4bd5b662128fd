"""Pure functions for top-1 capacity dispatch: which tokens each expert keeps, in what order."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int) -> int:
    """capacity = max(min_capacity, ceil(capacity_factor * tokens / experts)), as in the paper."""
    return max(min_capacity, math.ceil(capacity_factor * num_tokens / num_experts))


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
