"""moeify.distributed: run a converted model over many processes with experts spread by a plan.

    moeify.distributed.init()                       # from torchrun's environment (gloo / NCCL)
    part = moeify.distributed.load_rank("out/dist4")  # this rank's part: dense weights + its experts
    ddp = moeify.distributed.data_parallel(part)     # DDP over the dense weights only
    loss.backward(); moeify.distributed.reduce_expert_gradients(part); optimizer.step()
"""
from __future__ import annotations

from .layers.expert_parallel import ExpertGroup, ExpertParallelFFN, expert_parameters
from .passes.lower_expert_parallel import LowerExpertParallel, lower_expert_parallel
from .runtime.env import init_distributed as init
from .runtime.failures import RankFailure
from .runtime.grads import data_parallel, reduce_expert_gradients
from .runtime.groups import ParallelGroups, build_groups
from .runtime.loader import load_rank
from .runtime.loop import RunConfig, RunReport, run
from .runtime.manifest import read_export_manifest, verify
from .targets.torch_distributed import DistributedExport, default_plan, export_distributed

__all__ = ["init", "load_rank", "data_parallel", "reduce_expert_gradients", "expert_parameters", "export_distributed",
           "default_plan", "DistributedExport", "ExpertGroup", "ExpertParallelFFN", "LowerExpertParallel",
           "lower_expert_parallel", "ParallelGroups", "build_groups", "RankFailure", "RunConfig", "RunReport", "run",
           "read_export_manifest", "verify"]
