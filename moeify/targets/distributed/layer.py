"""ExpertParallelFFN: a SwitchFFN whose expert step reaches experts on several ranks by all-to-all."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from moeify.layers.dispatch import Dispatch, StaticDispatch
from moeify.layers.experts import Experts
from moeify.layers.router import RouterOutput
from moeify.layers.switch import SwitchFFN
from moeify.targets.distributed import comm


@dataclass(frozen=True)
class ExpertGroup:
    """This rank's expert-parallel group: its size, this rank's index in it, the process group.

    `group` is None only for structure work (emission, a group of one): forward then refuses
    to run with more than one member instead of silently skipping the exchange.
    """

    rank: int  # index of this rank within the group (what the plan's placement refers to)
    size: int
    group: Any = None  # its process group (comm.ProcessGroup)


def local_experts(full: Experts, ids: list[int]) -> Experts:
    """An Experts module holding only experts `ids` of `full` (values copied; meta stays meta)."""
    local = Experts(len(ids), full.d_model, full.d_ff, full.act, gated=full.gated, bias=full.b_in is not None,
                    out_bias=full.b_out is not None, dropout=full.dropout.p, dtype=full.w_in.dtype, device="meta")
    index = torch.tensor(ids, dtype=torch.long, device=full.w_in.device)
    for name, p in full.named_parameters(recurse=False):
        setattr(local, name, nn.Parameter(p.detach().index_select(0, index), requires_grad=p.requires_grad))
    return local


class ExpertParallelFFN(SwitchFFN):
    """SwitchFFN.forward with an expert step that crosses ranks: kept (token, choice) assignments go
    into a [E, C, d_model] buffer -> all-to-all -> this rank's experts -> all-to-all back (Fedus et
    al. 2021, Section 2.2 and Figure 13); routing, dispatch, gating and combining are SwitchFFN's own.

    Computes, on this rank's tokens, exactly what the single-process SwitchFFN computes on them:
    capacity comes from the local token count (when dropless, from the local busiest expert), and
    within each expert first choices, then earlier local tokens, win.
    router_losses(), summarize() and capacity() apply unchanged; `experts` holds only this rank's
    experts (copies of replicated ones too), in ascending id (`expert_ids`).
    """

    @property
    def device_dispatch(self) -> bool:
        """The static exchange (the cuda kernel's plan) needs one capacity known from shapes alone: not dropless,
        whose capacity is the busiest expert's count."""
        return not self.routing.dropless

    def __init__(self, switch: SwitchFFN, placement: list[int], group: ExpertGroup,
                 replicas: dict[str, list[int]] | None = None) -> None:
        num_experts = switch.num_experts
        if len(placement) != num_experts or not all(0 <= r < group.size for r in placement):
            raise ValueError(f"placement {placement} does not fit {num_experts} experts on {group.size} ranks")
        holders = [sorted((replicas or {}).get(str(e), [r])) for e, r in enumerate(placement)]
        if any(placement[e] not in h or len(set(h)) != len(h) or not all(0 <= r < group.size for r in h)
               for e, h in enumerate(holders)):
            raise ValueError(f"replicas {replicas} do not fit placement {placement} on {group.size} ranks")
        expert_ids = [e for e, h in enumerate(holders) if group.rank in h]  # home copies and replicas
        full = switch.experts
        super().__init__(full.d_model, full.d_ff, switch.routing, full.act, router=switch.router,
                         experts=local_experts(full, expert_ids))
        self.holders = holders  # expert id -> the group ranks holding a copy, sorted
        self.replicated = [e for e, h in enumerate(holders) if len(h) > 1]
        self.group = group
        self.expert_ids = expert_ids
        # Source s sends expert e's tokens to copy holders[e][s % len]: fixed, so no extra exchange,
        # and the senders spread over the copies.
        target = [[h[s % len(h)] for h in holders] for s in range(group.size)]
        mine = target[group.rank]
        # Each source sends every expert to exactly one rank, so its buffer is still [E * C] rows,
        # in blocks ordered by (destination rank, expert id): each destination's part is one split.
        order = sorted(range(num_experts), key=lambda e: (mine[e], e))
        self._block = [0] * num_experts  # expert id -> its block in this rank's send buffer
        for block, e in enumerate(order):
            self._block[e] = block
        self._per_rank = [mine.count(r) for r in range(group.size)]  # experts this rank sends to each member
        # What each member sends here: its blocks for this rank, as indices into self.expert_ids.
        self._from = [[i for i, e in enumerate(self.expert_ids) if target[s][e] == group.rank]
                      for s in range(group.size)]
        self._tables: dict[torch.device, torch.Tensor] = {}  # device -> self._block as a tensor
        self._replica_rows: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._arrival: tuple | None = None  # ((capacities, device), order, inverse, counts) of the last call

    def _expert_step(self, x: torch.Tensor, route: RouterOutput, plan: Dispatch) -> torch.Tensor:
        """Send buffer -> all-to-all -> local experts -> all-to-all back: the kept assignments' outputs, (K, d_model).

        C is plan.capacity: the capacity, or when dropless this rank's busiest expert, so members'
        buffers differ in size and every exchange uses each member's own C."""
        capacity = plan.capacity
        row = self._buffer_rows(plan.expert, plan.counts, capacity)  # (K,)
        send = x.new_zeros(self.num_experts * capacity, x.shape[-1])  # [E * C, d_model], empty slots 0
        send = send.index_copy(0, row, x.index_select(0, plan.token_index))
        capacities = self._capacities(capacity, x.device)  # every member's C: batches may differ
        to_experts = [n * capacity for n in self._per_rank]  # rows this rank sends to each member
        from_members = [len(f) * c for f, c in zip(self._from, capacities)]  # rows each member sends here
        received = self._exchange(send, from_members, to_experts)
        computed = self._run_experts(received, capacities)
        back = self._exchange(computed, to_experts, from_members)  # (E * C, d_model), same rows as send
        return back.index_select(0, row)

    def keeps_every_token(self, num_tokens: int) -> bool:
        return False  # the one expert may live on another rank: tokens always take the exchange

    def _static_expert_step(self, x: torch.Tensor, route: RouterOutput, plan: StaticDispatch) -> torch.Tensor:
        """The same exchange with every size from shapes alone, so a CUDA step never waits for the host: every
        member's C is this rank's (members must route equal token counts, which is checked on the device), and
        dropped assignments go to a spare row past the buffer. Outputs of every assignment, (A, d_model)."""
        capacity = self.capacity(x.shape[0])
        self._check_same_capacity(capacity, x.device)
        expert = route.expert_index.t().reshape(-1).index_select(0, plan.assignment)  # (A,)
        kept = plan.routed.clamp(max=capacity)
        slot = torch.arange(expert.numel(), device=x.device) - (torch.cumsum(kept, 0) - kept)[expert]
        spare = self.num_experts * capacity
        row = torch.where(plan.keep, self._block_table(x.device)[expert] * capacity + slot, spare)  # (A,)
        send = x.new_zeros(spare + 1, x.shape[-1]).index_copy(0, row, x.index_select(0, plan.token_index))[:spare]
        to_experts = [n * capacity for n in self._per_rank]
        from_members = [len(f) * capacity for f in self._from]
        received = self._exchange(send, from_members, to_experts)
        computed = self._run_experts(received, [capacity] * self.group.size, on_device=True)
        back = self._exchange(computed, to_experts, from_members)  # (E * C, d_model)
        return back.index_select(0, torch.where(plan.keep, row, 0))  # dropped rows: masked by the caller

    def _check_same_capacity(self, capacity: int, device: torch.device) -> None:
        """Assert on the device, without waiting for it, that every member has this capacity."""
        if self.group.size == 1:
            return
        self._check_group()
        mine = torch.full((1,), capacity, dtype=torch.long, device=device)
        every = comm.all_gather_single(mine, self.group.group, self.group.size)
        torch._assert_async((every == mine).all(), "expert-parallel members route different token counts: the "
                                                   "cuda kernel's static exchange needs equal batches on every rank")

    def _block_table(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = torch.tensor(self._block, device=device)
        return self._tables[device]

    def _buffer_rows(self, kept_expert: torch.Tensor, counts: list[int], capacity: int) -> torch.Tensor:
        """Buffer row of each kept assignment: its expert's block * C + its rank among that expert's."""
        device = kept_expert.device
        counts_t = torch.tensor(counts, device=device)
        starts = torch.cumsum(counts_t, 0) - counts_t  # (E,) first kept assignment of each expert
        slot = torch.arange(kept_expert.numel(), device=device) - starts[kept_expert]
        return self._block_table(device)[kept_expert] * capacity + slot

    def _capacities(self, capacity: int, device: torch.device) -> list[int]:
        """Each group member's capacity, in group order (one tiny all-gather per call)."""
        if self.group.size == 1:
            return [capacity]
        self._check_group()
        mine = torch.tensor([capacity], dtype=torch.long, device=device)
        return comm.all_gather_single(mine, self.group.group, self.group.size).tolist()

    def _exchange(self, x: torch.Tensor, receive: list[int], send: list[int]) -> torch.Tensor:
        """all_to_all_single with uneven splits; its backward runs the same exchange reversed."""
        if self.group.size == 1:
            return x
        self._check_group()
        return comm.all_to_all(x, receive, send, self.group.group)

    def _run_experts(self, received: torch.Tensor, capacities: list[int], on_device: bool = False) -> torch.Tensor:
        """Rows arrive as [member][its experts for this rank][C_member]; experts want them grouped by expert.
        on_device: hand the kernel its counts as a device tensor (uploaded once per shape), not a list."""
        if not self.expert_ids:
            return received.new_zeros(0, self.experts.d_model)
        key = (tuple(capacities), received.device)
        if self._arrival is None or self._arrival[0] != key:  # batches keep their sizes: usually a hit
            order, counts = self._grouping(capacities, received.device)
            back = torch.empty_like(order)
            back[order] = torch.arange(order.numel(), device=order.device)
            self._arrival = (key, order, back, counts, torch.tensor(counts, device=received.device))
        _, order, back, counts, device_counts = self._arrival
        y = self.experts(received, device_counts if on_device else counts, self.routing.kernel, rows=order)
        return y.index_select(0, back)  # in arrival order again, for the return exchange

    def _grouping(self, capacities: list[int], device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """Arrival rows reordered to [local expert][member, ascending][C_member], and rows per local expert.

        A replicated copy only gets the members that chose it, so counts may differ between experts.
        """
        pieces: list[list[torch.Tensor]] = [[] for _ in self.expert_ids]
        start = 0
        for member, c in enumerate(capacities):
            for i in self._from[member]:
                pieces[i].append(torch.arange(start, start + c, device=device))
                start += c
        counts = [sum(p.numel() for p in ps) for ps in pieces]
        order = torch.cat([p for ps in pieces for p in ps])  # every copy has at least one member
        return order, counts

    def replica_rows(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For the local experts that are copies of replicated ones: their rows in `experts`, and
        each one's slot in `replicated` (for reduce_expert_gradients; cached per device)."""
        if device not in self._replica_rows:
            local = [i for i, e in enumerate(self.expert_ids) if e in self.replicated]
            self._replica_rows[device] = (torch.tensor(local, dtype=torch.long, device=device),
                                          torch.tensor([self.replicated.index(self.expert_ids[i]) for i in local],
                                                       dtype=torch.long, device=device))
        return self._replica_rows[device]

    def _check_group(self) -> None:
        if self.group.group is None:
            raise RuntimeError("this ExpertParallelFFN was built for structure only (no process group): "
                               "load it with moeify.distributed.load_rank to run it")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, experts={self.expert_ids} of {self.num_experts}, "
                f"group_rank={self.group.rank}/{self.group.size}")


def _expert_weights(model: nn.Module) -> Iterator[tuple[str, ExpertParallelFFN, nn.Parameter]]:
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallelFFN):
            for p, w in m.experts.named_parameters():
                yield (f"{name}.experts.{p}" if name else f"experts.{p}"), m, w


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """This rank's expert weights by state-dict name; everything else in a lowered model is dense."""
    return {name: w for name, _, w in _expert_weights(model)}


def local_expert_ids(part: nn.Module) -> dict[str, list[int]]:
    """{layer name: global ids of the experts this rank holds}."""
    return {n: m.expert_ids for n, m in part.named_modules() if isinstance(m, ExpertParallelFFN)}


def expert_rows(model: nn.Module) -> dict[str, list[int]]:
    """For each expert weight: the global expert id of each of its rows."""
    return {name: m.expert_ids for name, m, _ in _expert_weights(model)}
