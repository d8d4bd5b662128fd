"""Expert -> rank placement inside an expert-parallel group: balanced, or load-aware with replicas."""
from __future__ import annotations

import heapq

import numpy as np


def balanced(num_experts: int, ep: int) -> list[int]:
    """Contiguous blocks: expert e on group rank e // (E / ep); uneven sizes differ by at most one."""
    sizes = [num_experts // ep + (r < num_experts % ep) for r in range(ep)]
    return [r for r, n in enumerate(sizes) for _ in range(n)]


def load_aware(loads: tuple[float, ...], ep: int) -> list[int]:
    """Longest-processing-time first: hottest expert to the least loaded rank with a free slot.

    Every rank keeps the same number of experts as `balanced` gives it, so memory stays level.
    """
    slots = np.bincount(balanced(len(loads), ep), minlength=ep).tolist()
    heap = [(0.0, r) for r in range(ep) if slots[r]]  # only ranks with a free slot
    placement = [0] * len(loads)
    for e in sorted(range(len(loads)), key=lambda e: -loads[e]):
        load, r = heapq.heappop(heap)
        placement[e] = r
        slots[r] -= 1
        if slots[r]:
            heapq.heappush(heap, (load + loads[e], r))
    return placement


def replicate_hot(placement: list[int], loads: tuple[float, ...], ep: int, count: int) -> dict[int, list[int]]:
    """Give the `count` hottest experts a second copy on the least loaded other rank.

    Each expert's ranks come sorted, home included. The runtime sends the tokens of source rank s
    to copy ranks[s % len(ranks)], so the copies split the senders: evenly when len(ranks)
    divides ep, which the estimate assumes.
    """
    replicas = {e: [r] for e, r in enumerate(placement)}
    rank_load = np.zeros(ep)
    for e, r in enumerate(placement):
        rank_load[r] += loads[e]
    for e in sorted(range(len(loads)), key=lambda e: -loads[e])[:count]:
        home = placement[e]
        others = [r for r in np.argsort(rank_load, kind="stable") if r != home]
        if not others:
            break
        extra = int(others[0])
        replicas[e].append(extra)
        rank_load[home] -= loads[e] / 2
        rank_load[extra] += loads[e] / 2
    return {e: sorted(r) for e, r in replicas.items()}
