"""Every call moeify makes into torch.distributed: process groups, collectives, queries.

The rest of moeify talks between processes only through this module, so what runs on the wire is
all listed here (tests/test_layout.py fails if another file of moeify/ imports torch.distributed):

  - process groups: init_process_group / destroy_process_group (the default group), new_group,
    mesh_dims (a DeviceMesh over the plan's [dp, ep] ranks, reduced to each dimension's group);
  - collectives: all_to_all (AllToAll, an autograd function over all_to_all_single),
    all_reduce, all_gather_single;
  - queries: is_initialized, get_rank, get_world_size; and DistError, the exception type of
    backend and store failures.

Not here, on purpose: grads.py wraps a part in `torch.nn.parallel.DistributedDataParallel`,
which runs its own bucketed all-reduces on the group it is handed; it is a module wrapper, not a
collective call. moeify/cli/run.py names the `torch.distributed.run` module only to start
torchrun as a subprocess.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

ProcessGroup = dist.ProcessGroup  # `None` for a group argument means the default group (all ranks)
DistError = dist.DistError  # what NCCL and the rendezvous store raise, e.g. for a lost peer

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


# Queries

def is_initialized() -> bool:
    return dist.is_initialized()


def get_rank(group: ProcessGroup | None = None) -> int:
    return dist.get_rank(group)


def get_world_size(group: ProcessGroup | None = None) -> int:
    return dist.get_world_size(group)


# Process groups

def init_process_group(backend: str, rank: int, world_size: int, timeout_s: float) -> None:
    """Join the default group from torchrun's MASTER_ADDR / MASTER_PORT (init_method env://)."""
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    dist.destroy_process_group()


def new_group(ranks: Sequence[int], timeout_s: float) -> ProcessGroup:
    """A group of `ranks` (collective: every rank of the default group must call it)."""
    return dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s))


@dataclass(frozen=True)
class MeshDim:
    """One dimension of a device mesh, seen from this rank."""

    group: ProcessGroup  # the ranks that share this rank's coordinates on the other dimensions
    local_rank: int  # this rank's index along the dimension


def mesh_dims(device_type: str, ranks: list[list[int]], dim_names: Sequence[str],
              timeout_s: float) -> dict[str, MeshDim]:
    """A DeviceMesh over `ranks` (collective), as {dimension name: its group and this rank's index}.

    Every dimension's group gets `timeout_s`: subgroups would otherwise keep the backend's
    30-minute default rather than init_process_group's timeout.
    """
    mesh = DeviceMesh(device_type, ranks, mesh_dim_names=tuple(dim_names))
    timeout = timedelta(seconds=timeout_s)
    dims = {}
    for name in dim_names:
        group = mesh.get_group(name)
        group.set_timeout(timeout)
        dims[name] = MeshDim(group, mesh.get_local_rank(name))
    return dims


# Collectives

def all_reduce(t: torch.Tensor, group: ProcessGroup | None = None, op: str = "sum") -> None:
    """In place over `group`; `op` is "sum" or "max"."""
    dist.all_reduce(t, op=_OPS[op], group=group)


def all_gather_single(t: torch.Tensor, group: ProcessGroup | None, size: int) -> torch.Tensor:
    """Every member's `t`, concatenated along dim 0 in group order (`size` members)."""
    out = t.new_empty(size * t.shape[0], *t.shape[1:])
    dist.all_gather_single(out, t.contiguous(), group=group)
    return out


class AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with split sizes; backward is the same exchange with the
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


def all_to_all(x: torch.Tensor, receive: list[int], send: list[int], group: ProcessGroup | None) -> torch.Tensor:
    """Rows of `x` in `send[r]`-row splits to each member r; `receive[r]` rows back from each. Differentiable."""
    return AllToAll.apply(x, receive, send, group)
