"""Process-group start-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from moeify.errors import MoeifyError
from moeify.targets.distributed import comm
from moeify.targets.distributed.failures import communication

REQUIRED = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "launch with `torchrun --nproc-per-node N -m moeify.run DIR` or `moeify run DIR --nproc N`"


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or any launcher following its contract) tells each process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "LaunchEnv":
        missing = [k for k in REQUIRED if not environ.get(k)]
        if missing:
            raise MoeifyError(f"{', '.join(missing)} not set: {LAUNCH_HINT}")
        try:
            env = cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", "0")),
                      environ["MASTER_ADDR"], int(environ["MASTER_PORT"]))
        except ValueError as e:
            raise MoeifyError(f"the launch environment is malformed ({e}): {LAUNCH_HINT}") from None
        if not 0 <= env.rank < env.world_size:
            raise MoeifyError(f"RANK={env.rank} is outside WORLD_SIZE={env.world_size}: {LAUNCH_HINT}")
        return env


def default_device(local_rank: int = 0) -> torch.device:
    """One GPU per process (cuda:LOCAL_RANK) when CUDA is there, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(timeout_s: float = 300.0) -> tuple[LaunchEnv, torch.device]:
    """Join the process group (NCCL on GPUs, gloo on CPUs); collectives fail after `timeout_s`."""
    env = LaunchEnv.from_environ()
    device = default_device(env.local_rank)
    if comm.is_initialized():
        return env, device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    with communication(f"rank {env.rank}: joining {env.world_size} ranks at {env.master_addr}:{env.master_port}"):
        comm.init_process_group(backend, env.rank, env.world_size, timeout_s)
    return env, device
