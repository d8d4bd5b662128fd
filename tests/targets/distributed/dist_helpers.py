"""Helpers of the distributed tests: one subprocess per rank (torchrun's env contract), tiny Switch T5s,
and the parity check of rank results against the single-process model."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny import tiny_t5
from torch import nn

import moeify
from moeify.layers.collector import router_losses
from moeify.layers.switch import expert_counts, switch_layers
from moeify.targets.distributed.export import default_plan, skeleton

TESTS = Path(__file__).resolve().parents[2]
ROOT = TESTS.parent
WORKER = Path(__file__).with_name("rank_worker.py")
LR = 0.5  # as in rank_worker.py
TOL = dict(rtol=1e-4, atol=1e-5)


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


def strided_plan(source: Path):
    """dp=2 x ep=2 on a strided mesh: ep groups [0, 2] and [1, 3]."""
    plan = default_plan(expert_counts(skeleton(source)), 4, expert_parallel=2, allow_uneven=True)
    plan.layout = "strided"
    plan.mesh.ranks = plan.expert_parallel_groups = [[0, 2], [1, 3]]
    plan.data_parallel_groups = [[0, 1], [2, 3]]
    return plan


def run_ranks(world: int, exports: list[Path], out: Path) -> list[list[tuple[dict, dict]]]:
    """rank_worker.py on every export in turn, in one spawn of `world` ranks (start-up is the cost):
    for each export, each rank's (tensors, metadata)."""
    outs = [out / f"run{i}" for i in range(len(exports))]
    for o in outs:
        o.mkdir(parents=True)
    args = [str(a) for e, o in zip(exports, outs) for a in (e, o)]
    results = finish(start_ranks(world, [str(WORKER), *args]), timeout=120 + 60 * len(exports))
    for rank, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{stdout}\n{stderr}"
    return [[(load_file(str(o / f"rank{r}.safetensors")), json.loads((o / f"rank{r}.json").read_text()))
             for r in range(world)] for o in outs]


def reference(source: Path, batches: list[dict]) -> dict:
    """The single-process model on every rank's batch, each with its own capacity.

    Loss-scaling rule: the reference loss is the mean over ranks of each rank's loss
    (model loss + router losses), L = (1/W) * sum_r L_r. "busiest": per batch, each layer's largest
    count of training assignments to one expert (a dropless layer's buffer size C on that rank).
    """
    model = moeify.load(source)
    model.eval()
    with torch.no_grad():
        eval_logits = [model(**b).logits for b in batches]
    model.train()
    train_logits, total, dropped, busiest = [], 0.0, 0, []
    for b in batches:
        with router_losses(model) as losses:
            out = model(**b)
        train_logits.append(out.logits.detach())
        total = total + (out.loss + losses.total()) / len(batches)
        dropped += sum(r.dropped for r in losses.layers)
        busiest.append([int(r.tokens_per_expert.max()) for r in losses.layers])
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    after = {n: p.detach() - LR * grads[n] for n, p in model.named_parameters()}
    routing = {layer.routing for layer in switch_layers(model).values()}
    return {"eval": eval_logits, "train": train_logits, "grads": grads, "after": after, "dropped": dropped,
            "busiest": busiest, "routing": routing}


def check_parity(source: Path, ranks: list[tuple[dict, dict]], drops: bool = True) -> dict:
    """Each rank's eval and train logits, every gradient and every parameter after one SGD step
    equal the reference's on that rank's batch; `drops`: whether capacity drops some assignments.
    Returns the reference."""
    batches = [{k.removeprefix("batch/"): v for k, v in res.items() if k.startswith("batch/")} for res, _ in ranks]
    assert len({b["input_ids"].shape[0] for b in batches}) > 1  # ranks differ in batch size, hence capacity
    ref = reference(source, batches)
    assert (ref["dropped"] > 0) == drops  # when capacity bites, per-rank capacity is what is tested
    for rank, (res, meta) in enumerate(ranks):
        torch.testing.assert_close(res["eval_logits"], ref["eval"][rank], **TOL)
        torch.testing.assert_close(res["train_logits"], ref["train"][rank], **TOL)
        experts = set(meta["expert_params"])
        checked = 0
        for name, grad in ref["grads"].items():
            for kind, want in (("grad", grad), ("param", ref["after"][name])):
                if name in experts:  # this rank's rows of the stacked expert tensor
                    want = want[meta["experts"][name.rsplit(".experts.", 1)[0]]]
                torch.testing.assert_close(res[f"{kind}/{name}"], want, **TOL, msg=f"rank {rank}: {kind} of {name}")
            checked += 1
        assert checked == len([k for k in res if k.startswith("grad/")])  # every parameter compared
    return ref
