"""Pure functions for capacity dispatch: which (token, choice) assignments each expert keeps, in what order.

dispatch() plans on the host (counts as a list: the cpu and reference kernels want them there); dispatch_static()
keeps every shape static and every count on the device, so that a CUDA step never waits for the host."""
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


def assignments_per_expert(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) how many entries of `flat` name each expert. Not torch.bincount, whose output size depends on the
    largest value, which a CUDA bincount reads back to the host."""
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def dispatch(expert_index: torch.Tensor, num_experts: int, capacity: int | None) -> Dispatch:
    """Sort assignments by expert and keep the first `capacity` of each (all of them when None).

    `expert_index` is (T, k). Every token's first choice comes before any second choice, and
    within a choice earlier tokens (flattened (batch, position) order) come first: so first
    choices win the slots, and with k = 1 this is the paper's "earlier tokens win".
    """
    flat = expert_index.t().reshape(-1)  # (A,) choice-major: a = choice * T + token
    order = torch.argsort(flat, stable=True)  # (A,) grouped by expert, earlier assignments first within one
    routed = assignments_per_expert(flat, num_experts)  # (E,)
    if capacity is None:
        capacity = int(routed.max()) if flat.numel() else 0
        assignment = order
    else:
        starts = torch.cumsum(routed, 0) - routed  # (E,) first sorted slot of each expert
        keep = (torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]) < capacity  # (A,)
        assignment = order[keep]  # (K,)
    counts = routed.clamp(max=capacity).tolist()
    token_index = assignment if expert_index.shape[1] == 1 else assignment % expert_index.shape[0]
    return Dispatch(assignment, token_index, flat.index_select(0, assignment), counts, routed, capacity)


class StaticDispatch(NamedTuple):
    """Every assignment, in a static shape: the kept ones grouped by expert (ascending), then the dropped ones."""

    assignment: torch.Tensor  # (A,) a = choice * T + token: kept ones by expert, then the dropped ones
    token_index: torch.Tensor  # (A,) the token of each
    keep: torch.Tensor  # (A,) bool: within its expert's capacity
    keep_by_assignment: torch.Tensor  # (A,) bool, the same indexed by a (with top-1: by token)
    counts: torch.Tensor  # (E,) rows per expert, on the device; the last expert's also holds the dropped rows
    routed: torch.Tensor  # (E,) assignments that chose each expert, before dropping


# Elements of dispatch_static's running count (E x A, 128 MiB in int64) beyond which it counts by sorting instead:
# two more sorts and gathers, O(A) memory (64 experts x 2 M assignments would take 1 GiB).
RUNNING_COUNT_MAX = 1 << 24


def _places(flat: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A,) each assignment's place within its expert, counting from 1 in assignment order, and (E,) the assignments
    per expert. Small plans read a running count along each expert's one-hot row at the assignment's own expert: on
    CUDA, where a step of small layers is bound by how many kernels it launches, that and the caller's one sort
    replace two sorts and their gathers. The count runs along the last dimension: CUDA scans an outer one a column
    per thread, serially (on an H200 the 8,192-token forward took 1.5-2.5 ms instead of 1.1-1.4). Larger plans sort."""
    if num_experts * flat.numel() <= RUNNING_COUNT_MAX:
        one_hot = torch.zeros(num_experts, flat.numel(), dtype=torch.long, device=flat.device)
        running = one_hot.scatter_(0, flat.unsqueeze(0), 1).cumsum_(1)  # (E, A)
        routed = running[:, -1] if flat.numel() else running.new_zeros(num_experts)
        return running.gather(0, flat.unsqueeze(0)).squeeze(0), routed
    order = torch.argsort(flat, stable=True)  # (A,) grouped by expert, earlier assignments first within one
    routed = assignments_per_expert(flat, num_experts)
    starts = torch.cumsum(routed, 0) - routed  # (E,) first sorted slot of each expert
    places = torch.empty_like(flat)
    places[order] = torch.arange(1, flat.numel() + 1, device=flat.device) - starts[flat[order]]
    return places, routed


def dispatch_static(expert_index: torch.Tensor, num_experts: int, capacity: int | None) -> StaticDispatch:
    """dispatch() without a host round trip: the same kept assignments in the same order, followed by the dropped
    ones (which the caller zeroes), so every shape is known from (T, k) alone. The dropped rows count as the last
    expert's, so a grouped GEMM covers all rows; zero inputs and masked outputs make them add nothing, gradients
    included."""
    flat = expert_index.t().reshape(-1)  # (A,) choice-major: a = choice * T + token
    if capacity is None:
        routed = assignments_per_expert(flat, num_experts)
        keep, kept, key = torch.ones_like(flat, dtype=torch.bool), routed, flat
    else:
        places, routed = _places(flat, num_experts)
        keep = places <= capacity  # (A,) in assignment order
        kept = routed.clamp(max=capacity)
        key = torch.where(keep, flat, flat + num_experts)  # kept ones by expert, then the dropped ones by expert
    assignment = torch.argsort(key, stable=True)  # ties keep assignment order: earlier tokens, first choices, first
    # The dropped rows ride with the last expert: its count is whatever the others leave of all A rows.
    counts = torch.cat([kept[:-1], flat.numel() - kept[:-1].sum(0, keepdim=True)])
    token_index = assignment if expert_index.shape[1] == 1 else assignment % expert_index.shape[0]
    return StaticDispatch(assignment, token_index, keep.index_select(0, assignment), keep, counts, routed)
