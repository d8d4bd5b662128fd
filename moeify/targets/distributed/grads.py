"""Gradient averaging: dense weights through DDP over all ranks, experts over their replicas.

The loss-scaling rule. Each rank r backpropagates its own mean loss L_r, unscaled. The reference
is the single-process model run once per rank batch (each with its own capacity) with loss
L = (1/W) * sum_r L_r over the W ranks. Then:
  - a dense weight on rank r gets dL_r/dw (only rank r's tokens touch its copy); DDP's average over
    all W ranks gives (1/W) * sum_r dL_r/dw = dL/dw.
  - an expert on rank r gets sum over its expert-parallel group of dL_q/dw (the group's tokens
    reach it through the all-to-all, and the backward all-to-all brings their gradients home).
    Summing over its expert-data-parallel group (the ranks holding the same expert in the other
    groups) covers every rank once; dividing by W gives dL/dw.
  - a replicated expert's copy gets only the part from the group members that send to it, so the
    copies are first summed over the expert-parallel group; then every copy holds the group's sum
    and the step above applies unchanged, leaving all copies with the same gradient dL/dw.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP  # a module wrapper: its all-reduces are its own

from moeify.errors import MoeifyError
from moeify.targets.distributed import comm
from moeify.targets.distributed.groups import RankPart
from moeify.targets.distributed.layer import ExpertParallelFFN, expert_parameters


def _check(part: RankPart, what: str) -> None:
    if not isinstance(part, RankPart):
        raise MoeifyError(f"{what} takes what moeify.distributed.load_rank returns (a RankPart: the model and "
                          f"its process groups), not a {type(part).__name__}: pass `part`, not `part.model`")


def data_parallel(part: RankPart, **ddp_options) -> DDP:
    """DDP over all ranks around `part.model`, for its dense weights only (experts are not replicas)."""
    _check(part, "data_parallel")
    model = part.model
    DDP._set_params_and_buffers_to_ignore_for_model(model, list(expert_parameters(model)))
    device = next(model.parameters()).device
    options = {"forward_sync_buffers": False, **ddp_options}  # buffers are loaded identically everywhere
    return DDP(model, process_group=part.groups.data_parallel,
               device_ids=[device] if device.type == "cuda" else None, **options)


def reduce_expert_gradients(part: RankPart) -> None:
    """After backward: each expert's gradient = sum over its copies and expert-data-parallel group / world size.

    One all-reduce for all experts of the rank (flattened), on the expert-data-parallel group, after
    one on the expert-parallel group for replicated experts only (when the plan has any);
    experts that got no token anywhere have a zero gradient rather than None.
    """
    _check(part, "reduce_expert_gradients")
    model, groups = part.model, part.groups
    params = list(expert_parameters(model).values())
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _sum_copies(model, groups.expert_parallel)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if comm.get_world_size(groups.expert_data_parallel) > 1:
        comm.all_reduce(flat, group=groups.expert_data_parallel)
    flat /= groups.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p)  # views of one buffer, like DDP's bucket views
        offset += n


def _sum_copies(model: nn.Module, group) -> None:
    """Sum each replicated expert's gradient over the copies in the expert-parallel group, in place.

    One all-reduce of a [replicated experts] block per expert weight, flattened; a rank adds zeros
    for the experts it holds no copy of. Every rank of the group has the same layers and the same
    replicated ids, so all take part or none does.
    """
    work = []  # (weight, its local rows that are copies, their slots in the block, the block)
    for m in model.modules():
        if isinstance(m, ExpertParallelFFN) and m.replicated:
            rows, slots = m.replica_rows(m.experts.w_in.device)
            for w in m.experts.parameters():
                block = w.grad.new_zeros(len(m.replicated), *w.shape[1:]).index_copy(0, slots, w.grad[rows])
                work.append((w, rows, slots, block))
    if not work:
        return
    flat = torch.cat([block.reshape(-1) for *_, block in work])
    comm.all_reduce(flat, group=group)
    offset = 0
    for w, rows, slots, block in work:
        summed = flat[offset:offset + block.numel()].view_as(block)
        w.grad.index_copy_(0, rows, summed.index_select(0, slots))
        offset += block.numel()
