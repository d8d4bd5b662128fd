"""`torchrun -m moeify.run`, `moeify run --nproc`, their exit statuses, and failing ranks."""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from dist_helpers import ROOT, finish, start_ranks

from moeify import cli

pytestmark = pytest.mark.slow
SMALL = ["--batch", "2", "--seq", "16"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def moeify_cli(*args):
    """The `moeify` console script, as installed: `python -m moeify.cli` runs the same group."""
    return [sys.executable, "-m", "moeify.cli", *map(str, args)]


def routed_tokens(stdout: str) -> dict[str, int]:
    """layer -> tokens routed over all ranks and steps, read from rank 0's statistics table."""
    rows = re.findall(r"^(\S+DenseReluDense) +([\d ]+?) +[\d.]+%\s*$", stdout, flags=re.M)
    return {name: sum(map(int, counts.split())) for name, counts in rows}


def test_torchrun_runs_training_steps_and_rank_0_reports(dist2):
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "moeify.run", str(dist2), "--steps", "3", "--train", *SMALL],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=150)
    assert done.returncode == 0, done.stderr
    # Steps 2 and 3 are timed: 2 steps x 2 ranks x 2 sequences x (16 encoder + 4 decoder tokens) = 160.
    assert re.search(r"2 ranks, 3 training steps: [\d,]+ tokens/s \(160 tokens in [\d.]+ s, first step untimed\); "
                     r"last loss [\d.]+ \(mean over ranks\)", done.stdout), done.stdout
    assert "router statistics over all ranks: dropped" in done.stdout
    # Every token of every rank and step is counted once: 2 ranks x 3 steps x 2 sequences x 16 (decoder: 4).
    assert routed_tokens(done.stdout) == {
        "encoder.block.1.layer.1.DenseReluDense": 192, "encoder.block.3.layer.1.DenseReluDense": 192,
        "decoder.block.1.layer.2.DenseReluDense": 48, "decoder.block.3.layer.2.DenseReluDense": 48}
    assert done.stdout.count("router statistics") == 1  # from rank 0 only


def test_moeify_run_wraps_torchrun(dist2):
    done = subprocess.run(moeify_cli("run", dist2, "--steps", "2", *SMALL), capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=150)
    assert done.returncode == 0, done.stderr
    assert "2 ranks, 2 forward steps" in done.stdout and "last loss" not in done.stdout


def test_moeify_run_refuses_a_wrong_process_count(dist2, tmp_path):
    main = cli.main  # the real group: `run` is registered by moeify.cli itself
    result = CliRunner().invoke(main, ["run", str(dist2), "--nproc", "3"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {dist2} was exported for 2 ranks: pass --nproc 2, or export again "
                                     "with --world-size 3")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist: export a model first" in result.stderr


def test_moeify_run_module_needs_a_launcher(dist2):
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "moeify.run", str(dist2)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set: launch with "
                                   "`torchrun --nproc-per-node N -m moeify.run DIR` or `moeify run DIR --nproc N`")


def test_a_corrupt_shard_stops_every_rank(dist2, tmp_path):
    export = shutil.copytree(dist2, tmp_path / "dist2")
    shard = export / "rank-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (code0, _, err0), (code1, _, err1) = finish(start_ranks(2, ["-m", "moeify.run", str(export), "--steps", "1"]))
    assert code1 == 2 and re.fullmatch(rf"error: rank 1: {shard} is corrupt: its sha256 is [0-9a-f]{{16}}\.\.\., "
                                       r"the manifest says [0-9a-f]{16}\.\.\.: copy it again or re-run "
                                       r"`moeify export`", err1.strip().splitlines()[-1]), err1
    assert code0 == 2 and err0.strip().splitlines()[-1] == ("error: rank 0: rank 1 refused its files (see its error), "
                                                            "so no rank starts")


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_failing_rank_makes_the_others_fail_within_the_timeout(dist2, how):
    procs = start_ranks(2, ["-m", "moeify.run", str(dist2), "--steps", "1000000", "--log-every", "1",
                            "--timeout", "5", "--batch", "1", "--seq", "8"])
    watchdog = threading.Timer(120, lambda: [p.kill() for p in procs])  # a hang fails the test, never blocks it
    watchdog.start()
    try:
        while "step 2/" not in procs[0].stdout.readline():  # both ranks are exchanging tokens
            assert procs[0].poll() is None, procs[0].stderr.read()
        os.kill(procs[1].pid, signal.SIGKILL if how == "dies" else signal.SIGSTOP)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        watchdog.cancel()
        os.kill(procs[1].pid, signal.SIGKILL)
        finish(procs)
    assert procs[0].returncode == 3, err
    assert re.fullmatch(r"error: rank 0: step \d+: lost contact with another rank \(.+\); a rank died or hung, so "
                        r"this run stops: see that rank's own error", err.strip().splitlines()[-1]), err
    assert elapsed < (5 if how == "dies" else 30)  # dies: the connection drops at once; hangs: the 5 s timeout


def test_ranks_read_their_rows_of_a_data_file(dist2, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(2, 64, (8, 12)), "decoder_input_ids": torch.randint(2, 64, (8, 3))},
              str(tmp_path / "tokens.safetensors"))
    results = finish(start_ranks(2, ["-m", "moeify.run", str(dist2), "--steps", "2", "--batch", "2",
                                     "--data", str(tmp_path / "tokens.safetensors")]))
    assert [code for code, _, _ in results] == [0, 0], results
    # 2 steps x 2 ranks x 2 rows, each of 12 encoder and 3 decoder tokens.
    assert set(routed_tokens(results[0][1]).values()) == {96, 24}
    (code, _, err), _ = finish(start_ranks(2, ["-m", "moeify.run", str(dist2), "--data", str(tmp_path / "no.st")]))
    assert code == 2 and err.strip().splitlines()[-1] == (f"error: rank 0: --data {tmp_path / 'no.st'} does not "
                                                          "exist: pass a safetensors file with input_ids [N, S]")
