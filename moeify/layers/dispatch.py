"""Pure functions for capacity dispatch: which (token, choice) assignments each expert keeps, in what order."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Dispatch(NamedTuple):
    assignment: torch.Tensor  # (K,) kept assignments a = choice * T + token, grouped by expert
    token_index: torch.Tensor  # (K,) the token of each kept assignment
    expert: torch.Tensor  # (K,) the expert of each kept assignment (ascending)
    counts: list[int]  # (E,) kept assignments per expert; sum(counts) == K
    routed: torch.Tensor  # (E,) assignments that chose each expert, before dropping
    capacity: int  # slots per expert: the limit, or when dropless the busiest expert's count


def dispatch(expert_index: torch.Tensor, num_experts: int, capacity: int | None) -> Dispatch:
    """Sort assignments by expert and keep the first `capacity` of each (all of them when None).

    `expert_index` is (T, k). Every token's first choice comes before any second choice, and
    within a choice earlier tokens (flattened (batch, position) order) come first: so first
    choices win the slots, and with k = 1 this is the paper's "earlier tokens win".
    """
    num_tokens = expert_index.shape[0]
    flat = expert_index.t().reshape(-1)  # (A,) choice-major: a = choice * T + token
    # A stable sort keeps that order inside each expert.
    order = torch.argsort(flat, stable=True)  # (A,)
    routed = torch.bincount(flat, minlength=num_experts)  # (E,)
    if capacity is None:
        capacity = int(routed.max()) if flat.numel() else 0
        assignment = order
    else:
        starts = torch.cumsum(routed, 0) - routed  # (E,) first sorted slot of each expert
        slot = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # (A,)
        assignment = order[slot < capacity]  # (K,)
    counts = routed.clamp(max=capacity).tolist()
    token_index = assignment if expert_index.shape[1] == 1 else assignment % num_tokens
    return Dispatch(assignment, token_index, flat.index_select(0, assignment), counts, routed, capacity)
