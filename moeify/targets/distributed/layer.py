"""ExpertParallelFFN: a SwitchFFN whose experts live on several ranks, reached by all-to-all."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from moeify.layers.dispatch import dispatch
from moeify.layers.experts import Experts
from moeify.layers.switch import SwitchFFN


@dataclass(frozen=True)
class ExpertGroup:
    """This rank's expert-parallel group: its size, this rank's index in it, the process group.

    `group` is None only for structure work (emission, a group of one): forward then refuses
    to run with more than one member instead of silently skipping the exchange.
    """

    rank: int  # index of this rank within the group (what the plan's placement refers to)
    size: int
    group: Any = None  # torch.distributed ProcessGroup


def local_experts(full: Experts, ids: list[int]) -> Experts:
    """An Experts module holding only experts `ids` of `full` (values copied; meta stays meta)."""
    local = Experts(len(ids), full.d_model, full.d_ff, full.act, gated=full.gated, bias=full.b_in is not None,
                    out_bias=full.b_out is not None, dropout=full.dropout.p, dtype=full.w_in.dtype, device="meta")
    index = torch.tensor(ids, dtype=torch.long, device=full.w_in.device)
    for name, p in full.named_parameters(recurse=False):
        setattr(local, name, nn.Parameter(p.detach().index_select(0, index), requires_grad=p.requires_grad))
    return local


class AllToAll(torch.autograd.Function):
    """dist.all_to_all_single along dim 0 with split sizes; backward is the same exchange with the
    splits swapped (the gradient of a row goes back to the rank that sent the row).

    Written here over the public collective because torch.distributed.nn.functional's version is
    deprecated in torch 2.13 and the functional-collectives one is private.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, receive: list[int], send: list[int], group) -> torch.Tensor:
        ctx.receive, ctx.send, ctx.group = receive, send, group
        out = x.new_empty(sum(receive), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=receive, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return AllToAll.apply(grad.contiguous(), ctx.send, ctx.receive, ctx.group), None, None, None


class ExpertParallelFFN(SwitchFFN):
    """Router -> local capacity dispatch into a [E, C, d_model] buffer -> all-to-all -> this rank's
    experts -> all-to-all back -> gate and combine (Fedus et al. 2021, Section 2.2 and Figure 13).

    Computes, on this rank's tokens, exactly what the single-process SwitchFFN computes on them:
    capacity comes from the local token count, and within each expert earlier local tokens win.
    It subclasses SwitchFFN so that router_losses(), summarize() and capacity() apply unchanged;
    `experts` holds only this rank's experts (copies of replicated ones too), in ascending id (`expert_ids`).
    """

    def __init__(self, switch: SwitchFFN, placement: list[int], group: ExpertGroup,
                 replicas: dict[str, list[int]] | None = None) -> None:
        # SwitchFFN.__init__ would allocate all E experts: take the parts from `switch` instead.
        nn.Module.__init__(self)
        if len(placement) != switch.num_experts or not all(0 <= r < group.size for r in placement):
            raise ValueError(f"placement {placement} does not fit {switch.num_experts} experts on {group.size} ranks")
        holders = [sorted((replicas or {}).get(str(e), [r])) for e, r in enumerate(placement)]
        if any(placement[e] not in h or len(set(h)) != len(h) or not all(0 <= r < group.size for r in h)
               for e, h in enumerate(holders)):
            raise ValueError(f"replicas {replicas} do not fit placement {placement} on {group.size} ranks")
        self.routing = switch.routing
        self.router = switch.router
        self.placement = list(placement)
        self.holders = holders  # expert id -> the group ranks holding a copy, sorted
        self.replicated = [e for e, h in enumerate(holders) if len(h) > 1]
        self.group = group
        self.expert_ids = [e for e, h in enumerate(holders) if group.rank in h]  # home copies and replicas
        self.experts = local_experts(switch.experts, self.expert_ids)
        # Source s sends expert e's tokens to copy holders[e][s % len]: fixed, so no extra exchange,
        # and the senders spread over the copies.
        target = [[h[s % len(h)] for h in holders] for s in range(group.size)]
        mine = target[group.rank]
        # Each source sends every expert to exactly one rank, so its buffer is still [E * C] rows,
        # in blocks ordered by (destination rank, expert id): each destination's part is one split.
        order = sorted(range(switch.num_experts), key=lambda e: (mine[e], e))
        self._block = [0] * switch.num_experts  # expert id -> its block in this rank's send buffer
        for block, e in enumerate(order):
            self._block[e] = block
        self._per_rank = [mine.count(r) for r in range(group.size)]  # experts this rank sends to each member
        # What each member sends here: its blocks for this rank, as indices into self.expert_ids.
        self._from = [[i for i, e in enumerate(self.expert_ids) if target[s][e] == group.rank]
                      for s in range(group.size)]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, d_model), flattened (batch, position) order
        route = self.router(x)
        capacity = self.capacity(x.shape[0])  # from this rank's tokens only, as in the paper
        plan = dispatch(route.expert_index, self.num_experts, capacity)
        row = self._buffer_rows(route.expert_index, plan.token_index, plan.counts, capacity)  # (K,)
        send = x.new_zeros(self.num_experts * capacity, x.shape[-1])  # [E * C, d_model], empty slots 0
        send = send.index_copy(0, row, x.index_select(0, plan.token_index))
        capacities = self._capacities(capacity, x.device)  # every member's C: batches may differ
        to_experts = [n * capacity for n in self._per_rank]  # rows this rank sends to each member
        from_members = [len(f) * c for f, c in zip(self._from, capacities)]  # rows each member sends here
        received = self._exchange(send, from_members, to_experts)
        computed = self._run_experts(received, capacities)
        back = self._exchange(computed, to_experts, from_members)  # (E * C, d_model), same rows as send
        y = back.index_select(0, row)  # (K, d_model)
        gate = route.gate.index_select(0, plan.token_index).to(y.dtype)  # the gate is how the router learns
        out = y.new_zeros(x.shape[0], y.shape[-1]).index_copy(0, plan.token_index, y * gate.unsqueeze(-1))
        return out.view(*shape[:-1], y.shape[-1])

    def _buffer_rows(self, expert_index: torch.Tensor, token_index: torch.Tensor, counts: list[int],
                     capacity: int) -> torch.Tensor:
        """Buffer row of each kept token: its expert's block * C + its rank among that expert's tokens."""
        kept_expert = expert_index.index_select(0, token_index)  # (K,), grouped by expert
        counts_t = torch.tensor(counts, device=token_index.device)
        starts = torch.cumsum(counts_t, 0) - counts_t  # (E,) first kept token of each expert
        slot = torch.arange(token_index.numel(), device=token_index.device) - starts[kept_expert]
        block = torch.tensor(self._block, device=token_index.device)
        return block[kept_expert] * capacity + slot

    def _capacities(self, capacity: int, device: torch.device) -> list[int]:
        """Each group member's capacity, in group order (one tiny all-gather per call)."""
        if self.group.size == 1:
            return [capacity]
        self._check_group()
        mine = torch.tensor([capacity], dtype=torch.long, device=device)
        gathered = torch.empty(self.group.size, dtype=torch.long, device=device)
        dist.all_gather_single(gathered, mine, group=self.group.group)
        return gathered.tolist()

    def _exchange(self, x: torch.Tensor, receive: list[int], send: list[int]) -> torch.Tensor:
        """all_to_all_single with uneven splits; its backward runs the same exchange reversed."""
        if self.group.size == 1:
            return x
        self._check_group()
        return AllToAll.apply(x, receive, send, self.group.group)

    def _run_experts(self, received: torch.Tensor, capacities: list[int]) -> torch.Tensor:
        """Rows arrive as [member][its experts for this rank][C_member]; experts want them grouped by expert."""
        if not self.expert_ids:
            return received.new_zeros(0, self.experts.d_model)
        order, counts = self._grouping(capacities, received.device)
        y = self.experts(received.index_select(0, order), counts)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=order.device)
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
