"""The process groups a plan asks for, built with DeviceMesh over the plan's [dp, ep] rank mesh."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moeify.errors import MoeifyError
from moeify.planner.plan import ShardingPlan, check_grid


@dataclass
class ParallelGroups:
    """This rank's view of the plan's groups.

    expert_parallel: the ranks that exchange tokens (a mesh row); together they hold every expert (replicated ones more than once).
    expert_data_parallel: the ranks holding the same experts (a mesh column, the plan's data-parallel
        group); expert gradients are reduced over it.
    data_parallel: every rank; dense weights are replicated on all, so their gradients average over it.
        Its own communicator, so DDP's bucketed all-reduces never interleave with the all-to-alls.
    """

    plan: ShardingPlan
    mesh: DeviceMesh
    rank: int
    world_size: int
    ep_rank: int  # index within the expert-parallel group: what placements refer to
    ep_size: int
    expert_parallel: Any
    expert_data_parallel: Any
    data_parallel: Any


def build_groups(plan: ShardingPlan, device_type: str, timeout_s: float = 300.0) -> ParallelGroups:
    """Every rank must call this with the same plan (group creation is collective).

    Collectives on these groups fail after `timeout_s` (a hung peer); subgroups would otherwise
    get the backend's 30-minute default, not init_process_group's timeout.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if plan.world_size != world:
        raise MoeifyError(f"the plan is for {plan.world_size} ranks but {world} are running: "
                          f"launch {plan.world_size} processes")
    check_grid(plan.mesh.ranks)  # the groups are its rows and columns: only the grid itself can be wrong
    rows = plan.mesh.rows
    mesh = DeviceMesh(device_type, rows, mesh_dim_names=("dp", "ep"))
    timeout = timedelta(seconds=timeout_s)
    dense = dist.new_group(list(range(world)), timeout=timeout)
    for dim in ("ep", "dp"):
        mesh.get_group(dim).set_timeout(timeout)
    return ParallelGroups(
        plan=plan, mesh=mesh, rank=rank, world_size=world, ep_rank=mesh.get_local_rank("ep"),
        ep_size=plan.expert_parallel_size, expert_parallel=mesh.get_group("ep"),
        expert_data_parallel=mesh.get_group("dp"), data_parallel=dense)
