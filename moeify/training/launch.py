"""`moeify train --nproc N`, the launcher side: check the mesh, export the model, run torchrun, report the outcome."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from moeify.errors import MoeifyError
from moeify.training.config import DataConfig, TrainConfig

if TYPE_CHECKING:
    from torch import nn

    from moeify.planner.plan import ShardingPlan

WORK = ".nproc"  # RUN_DIR/.nproc: the export, the scratch of the checkpoints, the ranks' reports; removed after
TIMEOUT_S = 300.0  # a rank that hangs this long makes the others fail
POLL_S = 0.5


def check_options(nproc: int | None, expert_parallel: int | None, dense: bool) -> None:
    """What can be refused before any model is loaded."""
    if nproc is None:
        if expert_parallel is not None:
            raise MoeifyError("--expert-parallel sets the mesh of a distributed run: add --nproc N, or drop it")
        return
    if nproc < 1:
        raise MoeifyError(f"--nproc must be at least 1, got {nproc}: pass the number of processes, e.g. --nproc 2, or "
                          "drop it to train in this one")
    if dense:
        raise MoeifyError("--nproc trains through the torch-distributed target, which needs Switch layers: "
                          "drop --dense or --nproc")


def check_mesh(model: nn.Module, nproc: int, expert_parallel: int | None, batch_size: int) -> ShardingPlan:
    """The default plan for `nproc` ranks (`expert_parallel` per group, default: default_plan's), or a
    one-line refusal naming the fix."""
    from moeify.layers.switch import expert_counts
    from moeify.targets.distributed.export import default_plan
    from moeify.training.slices import check_divisible

    check_options(nproc, expert_parallel, False)
    counts = expert_counts(model)
    if not counts:
        raise MoeifyError("--nproc trains through the torch-distributed target, which needs Switch layers: "
                          "drop --dense (or --nproc)")
    check_divisible(batch_size, nproc)
    if expert_parallel is not None:
        if expert_parallel < 1 or nproc % expert_parallel:
            divisors = ", ".join(str(d) for d in range(1, nproc + 1) if nproc % d == 0)
            raise MoeifyError(f"--expert-parallel {expert_parallel} does not divide --nproc {nproc}: use one of "
                              f"{divisors}")
        uneven = sorted({e for e in counts.values() if e % expert_parallel})
        if uneven:
            raise MoeifyError(f"--expert-parallel {expert_parallel} cannot split {uneven[0]} experts evenly: use a "
                              f"size that divides {uneven[0]} and {nproc}")
    return default_plan(counts, nproc, expert_parallel=expert_parallel)


def run_ranks(model: nn.Module, plan: ShardingPlan, run_dir: Path, source: str, train: TrainConfig,
              data: DataConfig, resume: dict | None = None, poll: Callable[[], None] = lambda: None) -> dict:
    """Save and export `model`, train it on plan.world_size ranks under torchrun, and return rank 0's
    result ({step, tokens, best_val_loss, saved}); a rank's user error becomes this process's MoeifyError.
    `poll()` is called about twice a second while the ranks run (the CLI's progress bar)."""
    from moeify.checkpoint.store import save
    from moeify.targets.distributed.entry import torchrun
    from moeify.targets.distributed.export import export_distributed

    work = run_dir / WORK
    if work.exists():
        shutil.rmtree(work)
    try:
        model_dir = save(model, work / "model")
        export = export_distributed(model_dir, work / "export", plan).path
        for sub in ("scratch", "errors"):
            (work / sub).mkdir()
        launch = {"export": str(export), "model_dir": str(model_dir), "scratch": str(work / "scratch"),
                  "errors": str(work / "errors"), "result": str(work / "result.json"), "run_dir": str(run_dir),
                  "source": source, "train": dataclasses.asdict(train), "timeout_s": TIMEOUT_S,
                  "data": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(data).items()},
                  "expert_parallel": plan.expert_parallel_size, "resume": resume}
        (work / "launch.json").write_text(json.dumps(launch, indent=2))
        code, interrupted = _torchrun(torchrun(plan.world_size, "moeify.training.rank", str(work / "launch.json")),
                                      work / "torchrun.log", poll)
        result = work / "result.json"
        if result.is_file():  # also after a Ctrl-C, which torchrun reports as its own failure: the ranks saved
            return json.loads(result.read_text())
        if interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: the ranks stopped at once
        _fail(work, code)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _torchrun(command: list[str], log: Path, poll: Callable[[], None]) -> tuple[int, bool]:
    """torchrun in its own session, its output (the ranks' too) in `log`; its exit status and whether a
    Ctrl-C or SIGTERM came. A Ctrl-C here is passed on once per press: torchrun hands it to the ranks, which
    checkpoint and stop (within torchrun's 30 s grace); a second one stops them at once. SIGTERM is passed on
    as it is: torchrun stops the ranks."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several ranks, without its warning
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        presses = []

        def forward(signum, frame) -> None:
            presses.append(signum)
            proc.send_signal(signum)

        # SIGTERM too (SLURM, Kubernetes): torchrun ends the ranks, and the work directory is removed only after.
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                try:
                    return proc.wait(timeout=POLL_S), bool(presses)
                except subprocess.TimeoutExpired:
                    poll()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _fail(work: Path, code: int) -> None:
    """The ranks' own error (the first user error, else the first lost-contact one), else torchrun's output."""
    from moeify.targets.distributed.entry import read_rank_reports

    reports = read_rank_reports(work / "errors")
    user = [r for r in reports if r["code"] == 2]
    if user:
        raise MoeifyError(user[0]["message"])
    crashed = [r for r in reports if r["code"] == 1]
    if crashed:  # a bug: its traceback
        print(crashed[0]["message"].rstrip(), file=sys.stderr)
        print("error: a rank crashed: its traceback is above", file=sys.stderr)
        raise SystemExit(1)
    if reports:
        print(f"error: {reports[0]['message']}", file=sys.stderr)
        raise SystemExit(reports[0]["code"])
    log = (work / "torchrun.log").read_text(errors="replace").strip().splitlines()
    print("\n".join(log[-60:]), file=sys.stderr)
    print(f"error: a rank failed (torchrun exit status {code}); its output is above", file=sys.stderr)
    raise SystemExit(code or 1)
