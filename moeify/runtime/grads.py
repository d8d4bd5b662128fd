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
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import MoeifyError
from ..layers.expert_parallel import expert_parameters


def _groups(part: nn.Module):
    groups = getattr(part, "moeify_parallel", None)
    if groups is None:
        raise MoeifyError("this model was not loaded with moeify.distributed.load_rank")
    return groups


def data_parallel(part: nn.Module, **ddp_options) -> DDP:
    """Wrap `part` in DDP over all ranks, for its dense weights only (experts are not replicas)."""
    groups = _groups(part)
    DDP._set_params_and_buffers_to_ignore_for_model(part, list(expert_parameters(part)))
    device = next(part.parameters()).device
    options = {"forward_sync_buffers": False, **ddp_options}  # buffers are loaded identically everywhere
    return DDP(part, process_group=groups.data_parallel,
               device_ids=[device] if device.type == "cuda" else None, **options)


def reduce_expert_gradients(part: nn.Module) -> None:
    """After backward: each expert's gradient = sum over its expert-data-parallel group / world size.

    One all-reduce for all experts of the rank (flattened), on the expert-data-parallel group;
    experts that got no token anywhere have a zero gradient rather than None.
    """
    groups = _groups(part)
    params = list(expert_parameters(part).values())
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    if dist.get_world_size(groups.expert_data_parallel) > 1:
        dist.all_reduce(flat, group=groups.expert_data_parallel)
    flat /= groups.world_size
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(p)  # views of one buffer, like DDP's bucket views
        offset += g.numel()
