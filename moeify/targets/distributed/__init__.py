"""moeify.distributed: run a converted model over many processes with experts spread by a plan.

    moeify.distributed.init()                         # from torchrun's environment (gloo / NCCL)
    part = moeify.distributed.load_rank("out/dist4")  # a RankPart: .model (dense weights + its experts), .groups
    ddp = moeify.distributed.data_parallel(part)      # DDP around part.model, over the dense weights only
    loss.backward(); moeify.distributed.reduce_expert_gradients(part); optimizer.step()

Every call into torch.distributed goes through moeify.targets.distributed.comm.
"""
from __future__ import annotations

from moeify.targets.distributed.env import init_distributed as init
from moeify.targets.distributed.export import (
           DistributedExport,
           default_plan,
           export_distributed,
)
from moeify.targets.distributed.failures import RankFailure
from moeify.targets.distributed.grads import data_parallel, reduce_expert_gradients
from moeify.targets.distributed.groups import ParallelGroups, RankPart, build_groups
from moeify.targets.distributed.layer import (
           ExpertGroup,
           ExpertParallelFFN,
           expert_parameters,
)
from moeify.targets.distributed.loader import load_rank
from moeify.targets.distributed.lower import LowerExpertParallel, lower_expert_parallel
from moeify.targets.distributed.manifest import read_export_manifest, verify
from moeify.targets.distributed.steps import RunConfig, RunReport, run

__all__ = ["init", "load_rank", "data_parallel", "reduce_expert_gradients", "expert_parameters", "export_distributed",
           "default_plan", "DistributedExport", "ExpertGroup", "ExpertParallelFFN", "LowerExpertParallel",
           "lower_expert_parallel", "ParallelGroups", "RankPart", "build_groups", "RankFailure", "RunConfig", "RunReport",
           "run", "read_export_manifest", "verify"]
