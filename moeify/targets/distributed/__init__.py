"""moeify.distributed: run a converted model over many processes with experts spread by a plan.

    moeify.distributed.init()                         # from torchrun's environment (gloo / NCCL)
    part = moeify.distributed.load_rank("out/dist4")  # a RankPart: .model (dense weights + its experts), .groups
    ddp = moeify.distributed.data_parallel(part)      # DDP around part.model, over the dense weights only
    loss.backward(); moeify.distributed.reduce_expert_gradients(part); optimizer.step()

Every call into torch.distributed goes through moeify.targets.distributed.comm.
"""
from __future__ import annotations

import importlib
from typing import Any

# The public names by submodule, imported on first use (PEP 562): `moeify run --help` and
# moeify.targets.distributed.entry do not import torch. `init` is env.init_distributed.
_MODULES = {
    "env": ["init"], "export": ["DistributedExport", "default_plan", "export_distributed"],
    "failures": ["RankFailure"], "grads": ["data_parallel", "reduce_expert_gradients"],
    "groups": ["ParallelGroups", "RankPart", "build_groups"],
    "layer": ["ExpertGroup", "ExpertParallelFFN", "expert_parameters"], "loader": ["load_rank"],
    "lower": ["lower_expert_parallel"], "manifest": ["read_export_manifest", "verify"],
    "steps": ["RunConfig", "RunReport", "run_steps"],
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    value = getattr(module, "init_distributed" if name == "init" else name)
    globals()[name] = value
    return value


__all__ = ["init", "load_rank", "data_parallel", "reduce_expert_gradients", "expert_parameters", "export_distributed",
           "default_plan", "DistributedExport", "ExpertGroup", "ExpertParallelFFN",
           "lower_expert_parallel", "ParallelGroups", "RankPart", "build_groups", "RankFailure", "RunConfig", "RunReport",
           "run_steps", "read_export_manifest", "verify"]
