"""load_rank: this rank's part of an export (built on meta, lowered, filled from its shard only) and its groups."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from moeify.checkpoint.skeleton import skeleton
from moeify.checkpoint.sources import assign_weights
from moeify.errors import MoeifyError
from moeify.planner.plan import ShardingPlan
from moeify.targets.distributed import comm
from moeify.targets.distributed.entry import check_export
from moeify.targets.distributed.env import LAUNCH_HINT, default_device
from moeify.targets.distributed.failures import PeerRefused, communication
from moeify.targets.distributed.groups import ParallelGroups, RankPart, build_groups
from moeify.targets.distributed.layer import ExpertGroup, local_expert_ids
from moeify.targets.distributed.lower import lower_expert_parallel
from moeify.targets.distributed.manifest import PLAN_FILE, verify


def load_rank(path: str | Path, *, model: nn.Module | None = None, device: str | torch.device | None = None,
              groups: ParallelGroups | None = None, check: bool = True, timeout_s: float = 300.0) -> RankPart:
    """This rank's part of a torch-distributed export, on an initialised process group.

    Returns a RankPart: `.model` holds the dense weights and this rank's experts; its Switch layers
    exchange tokens with the rest of its expert-parallel group, so on this rank's batch it computes
    what the single-process model computes. `.groups` are the plan's process groups, which
    data_parallel(part) and reduce_expert_gradients(part) use.
    `model`: a fresh dense instance, for custom-module sources. `groups`: groups already built
    with build_groups (else built here, collectively). `check` verifies the shared files and this
    rank's shard against the manifest's sha256. Collectives of the groups fail after `timeout_s`
    when a peer hangs.
    """
    if not comm.is_initialized():
        raise MoeifyError(f"load_rank needs an initialised process group: {LAUNCH_HINT}, "
                          "or call moeify.distributed.init() first")
    path = Path(path)
    rank, world = comm.get_rank(), comm.get_world_size()
    manifest = check_export(path, world)  # what every rank refuses alike, before this function's first collective
    shard = manifest.ranks[rank]
    device = torch.device(device) if device is not None else default_device(int(os.environ.get("LOCAL_RANK", "0")))
    if check:
        _verify_everywhere(path, manifest, shard.file, rank, device)
    plan = ShardingPlan.load(path / PLAN_FILE)
    with communication(f"rank {rank}: building the plan's process groups"):
        if groups is None:
            groups = build_groups(plan, device.type, timeout_s)
    buffers: dict[str, torch.Tensor] = {}
    part = lower_expert_parallel(skeleton(path, model, buffers), plan,
                                 ExpertGroup(groups.ep_rank, groups.ep_size, groups.expert_parallel))
    if local_expert_ids(part) != shard.experts:
        raise MoeifyError(f"{path / shard.file} holds other experts than the plan gives rank {rank}: "
                          "re-run `moeify export`")
    assign_weights(part, [path / shard.file], buffers=buffers, device=device)
    return RankPart(part, groups)


def _verify_everywhere(path: Path, manifest, shard: str, rank: int, device: torch.device) -> None:
    """Each rank checks the shared files and its own shard, then all agree: one refusal stops every
    rank at once, instead of leaving the others to time out waiting for it."""
    error = None
    try:
        shards = {r.file for r in manifest.ranks}
        verify(path, manifest, [n for n in manifest.files if n not in shards] + [shard])
    except MoeifyError as e:
        error = e
    refused = torch.tensor([rank if error else -1], device=device)
    with communication(f"rank {rank}: checking the export's files"):
        comm.all_reduce(refused, op="max")
    if error is not None:
        raise error
    if refused.item() >= 0:
        raise PeerRefused(f"rank {refused.item()} refused its files (see its error), so no rank starts")
