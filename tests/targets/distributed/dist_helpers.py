"""Helpers of the distributed tests: one subprocess per rank (torchrun's env contract), tiny Switch T5s."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tiny import tiny_t5
from torch import nn

import moeify

TESTS = Path(__file__).resolve().parents[2]
ROOT = TESTS.parent
WORKER = Path(__file__).with_name("rank_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def start_ranks(world: int, args: list[str]) -> list[subprocess.Popen]:
    """`python ARGS` once per rank, as torchrun would start them (without its agent)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, *args], env=rank_env(r, world, port), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) per rank; kills every rank if any overruns (a hang fails the test)."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def converted_t5(num_experts: int = 4, **config) -> nn.Module:
    """A tiny T5 with random experts (so experts differ) and tight capacity (so tokens drop)."""
    kw = dict(num_experts=num_experts, init="random", capacity_factor=1.0, eval_capacity_factor=1.0,
              min_capacity=1)
    kw.update(config)
    return moeify.convert(tiny_t5("relu"), moeify.MoEConfig(**kw))
