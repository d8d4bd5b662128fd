"""The process groups a plan asks for (a DeviceMesh over its [dp, ep] rank mesh), and RankPart:
a rank's part of the model together with them, as load_rank returns it."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moeify.errors import MoeifyError
from moeify.planner.plan import ShardingPlan, check_grid
from moeify.targets.distributed import comm


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's view of the plan's groups.

    expert_parallel: the ranks that exchange tokens (a mesh row); together they hold every expert
        (replicated ones more than once).
    expert_data_parallel: the ranks holding the same experts (a mesh column, the plan's data-parallel
        group); expert gradients are reduced over it.
    data_parallel: every rank; dense weights are replicated on all, so their gradients average over it.
        Its own communicator, so DDP's bucketed all-reduces never interleave with the all-to-alls.
    """

    rank: int
    world_size: int
    ep_rank: int  # index within the expert-parallel group: what placements refer to
    ep_size: int
    expert_parallel: comm.ProcessGroup
    expert_data_parallel: comm.ProcessGroup
    data_parallel: comm.ProcessGroup


@dataclass(frozen=True)
class RankPart:
    """This rank's part of an export, as moeify.distributed.load_rank returns it.

    model: the part itself (dense weights + this rank's experts); call it, train it, save it.
    groups: the process groups it runs on, which data_parallel() and reduce_expert_gradients() use.
    """

    model: nn.Module
    groups: ParallelGroups


def build_groups(plan: ShardingPlan, device_type: str, timeout_s: float = 300.0) -> ParallelGroups:
    """Every rank must call this with the same plan (group creation is collective).

    Collectives on these groups fail after `timeout_s` (a hung peer); subgroups would otherwise
    get the backend's 30-minute default, not init_process_group's timeout.
    """
    world, rank = comm.get_world_size(), comm.get_rank()
    if plan.world_size != world:
        raise MoeifyError(f"the plan is for {plan.world_size} ranks but {world} are running: "
                          f"launch {plan.world_size} processes")
    check_grid(plan.mesh.ranks)  # the groups are its rows and columns: only the grid itself can be wrong
    rows = plan.mesh.rows
    dims = comm.mesh_dims(device_type, rows, ("dp", "ep"), timeout_s)
    dense = comm.new_group(range(world), timeout_s)
    return ParallelGroups(rank=rank, world_size=world, ep_rank=dims["ep"].local_rank, ep_size=plan.expert_parallel_size,
                          expert_parallel=dims["ep"].group, expert_data_parallel=dims["dp"].group, data_parallel=dense)
