"""`moeify run` refuses bad exports and flags before torchrun starts; a rank's refusal is one line, exit 2."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from clitools import run
from dist_helpers import ROOT, finish, free_port, rank_env, start_ranks

from moeify.targets.distributed.export import default_plan

SHARD0, SHARD1 = "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"
MOVED = "copy the whole export directory, or re-run `moeify export`"
FOREIGN = ("is not the shard this export's manifest lists (another export's, or cut short): copy the whole export "
           "directory again, or re-run `moeify export`")


def layers(export):
    return {layer["name"]: layer["num_experts"]
            for layer in json.loads((export / "moeify.json").read_text())["summary"]["moe_layers"]}


def break_export(export, how):
    """Damage a copy of an export as users do; returns what the refusal names."""
    if how == "missing shard":
        (export / SHARD1).unlink()
        return f"{export / SHARD1} is missing: {MOVED}"
    if how == "shard of another rank":  # same size, another export's (or rank's) content
        shutil.copyfile(export / SHARD0, export / SHARD1)
        return f"{export / SHARD1} {FOREIGN}"
    if how == "cut shard":
        data = (export / SHARD1).read_bytes()
        (export / SHARD1).write_bytes(data[:len(data) // 2])
        return f"{export / SHARD1} {FOREIGN}"
    if how == "plan for 4 ranks":
        default_plan(layers(export), 4).save(export / "plan.json")
        return (f"{export / 'plan.json'} is a plan for another model or export (4 ranks, the export 2): copy the "
                "export's own plan.json back, or re-run `moeify export`")
    if how == "plan for another model":
        counts = {name.replace("block.1.", "block.9."): n for name, n in layers(export).items()}
        default_plan(counts, 2).save(export / "plan.json")
        return (f"{export / 'plan.json'} is a plan for another model or export (it places "
                "['decoder.block.9.layer.2.DenseReluDense', 'encoder.block.9.layer.1.DenseReluDense'], which the "
                "model lacks): copy the export's own plan.json back, or re-run `moeify export`")
    if how == "no manifest":
        (export / "manifest.json").unlink()
        return (f"{export} is not a torch-distributed export (no manifest.json): make one with "
                "`moeify export MODEL --target torch-distributed`")
    if how == "no moeify.json":
        (export / "moeify.json").unlink()
        return f"{export / 'moeify.json'} is missing: {MOVED}"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["missing shard", "shard of another rank", "cut shard", "plan for 4 ranks",
                                 "plan for another model", "no manifest", "no moeify.json"])
def test_moeify_run_refuses_a_broken_export_before_torchrun(dist2, tmp_path, how):
    export = shutil.copytree(dist2, tmp_path / "dist2")
    message = break_export(export, how)
    start = time.monotonic()
    result = run("run", export)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {message}" and not result.stdout
    assert time.monotonic() - start < 5  # refused here: no torchrun, no ranks


@pytest.mark.parametrize("args,message", [
    (["--nproc", "0"], "--nproc must be at least 1, got 0: leave it unset for the export's world size"),
    (["--steps", "0"], "--steps must be at least 1, got 0: leave it unset for --steps 10, the default"),
    (["--batch", "-1"], "--batch must be at least 1, got -1: leave it unset for --batch 8, the default"),
    (["--seq", "0"], "--seq must be at least 1, got 0: leave it unset for --seq 64, the default"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds, got 0.0: leave it unset for --timeout "
                         "300.0, the default"),
    (["--timeout", "nan"], "--timeout must be a positive number of seconds, got nan: leave it unset for --timeout "
                           "300.0, the default"),
    (["--lr", "inf"], "--lr must be a positive number, got inf: leave it unset for --lr 0.0001, the default"),
    (["--log-every", "-1"], "--log-every must be at least 0 (0: the summary only), got -1: leave it unset for "
                            "--log-every 0, the default"),
    (["--data", "DIR/none.safetensors"], "--data DIR/none.safetensors does not exist: pass a safetensors file with "
                                         "input_ids [N, S]"),
    (["--data", "DIR/text.txt"], "--data DIR/text.txt is not a safetensors file: save the token ids with "
                                 "safetensors.torch.save_file({'input_ids': ids}, PATH)"),
    (["--data", "DIR/labels.safetensors"], "--data DIR/labels.safetensors has no 2-D input_ids tensor: store token "
                                           "ids as input_ids [N, S]"),
])
def test_moeify_run_refuses_bad_flags_before_torchrun(dist2, tmp_path, args, message):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "text.txt").write_text("not tensors")
    save_file({"labels": torch.zeros(2, 3, dtype=torch.long)}, str(tmp_path / "labels.safetensors"))
    result = run("run", dist2, *[a.replace("DIR", str(tmp_path)) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: " + message.replace("DIR", str(tmp_path)) and not result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how,world", [("missing shard", 2), ("plan for another model", 2), ("world", 3)])
def test_a_rank_refuses_before_joining_the_others(dist2, tmp_path, how, world):
    """Under a bare torchrun: one rank started alone never waits for its peers (it would, in
    init_process_group, until --timeout): it refuses what every rank can check, at once."""
    export = shutil.copytree(dist2, tmp_path / "dist2")
    message = (f"{export} was exported for 2 ranks but 3 are running: launch with --nproc 2" if how == "world"
               else break_export(export, how))
    start = time.monotonic()
    # Joining the group would wait for the missing peers for --timeout, far past this test's own timeout.
    proc = subprocess.run([sys.executable, "-m", "moeify.run", str(export), "--timeout", "600"],
                          env=rank_env(1, world, free_port()), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: rank 1: {message}"
    assert time.monotonic() - start < 120  # start-up only, never the 600 s timeout


@pytest.mark.slow
def test_moeify_run_reports_a_ranks_refusal_once_as_one_line(dist2, tmp_path):
    """A shard whose bytes changed (its size and header intact) is found by its own rank's sha256 only:
    the ranks start, rank 1 refuses, rank 0 stops with it, and the launcher says rank 1's error once."""
    export = shutil.copytree(dist2, tmp_path / "dist2")
    data = bytearray((export / SHARD1).read_bytes())
    data[-1] ^= 0xFF
    (export / SHARD1).write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-m", "moeify.cli", "run", str(export), "--steps", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=150,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(rf"error: rank 1: {re.escape(str(export / SHARD1))} is corrupt: its sha256 is "
                        r"[0-9a-f]{16}\.\.\., the manifest says [0-9a-f]{16}\.\.\.: copy it again or re-run "
                        r"`moeify export`", done.stderr.strip()), done.stderr


@pytest.mark.slow
def test_bare_ranks_still_report_each_error(dist2, tmp_path):
    """Without `moeify run` (no error folder), each rank prints its own line as before."""
    export = shutil.copytree(dist2, tmp_path / "dist2")
    (export / SHARD1).unlink()
    results = finish(start_ranks(2, ["-m", "moeify.run", str(export)]), timeout=60)
    for rank, (code, _, err) in enumerate(results):
        assert code == 2 and err.strip() == f"error: rank {rank}: {export / SHARD1} is missing: {MOVED}"


def test_no_verify_trusts_the_export_without_hashing(dist2, tmp_path):
    """A flipped byte in plan.json's JSON whitespace keeps it valid but changes its sha256: refused by default,
    let through with --no-verify (here to the next check, the rank count, so no process starts)."""
    export = shutil.copytree(dist2, tmp_path / "d")
    plan = export / "plan.json"
    plan.write_text(plan.read_text() + " ")
    refused = run("run", export, "--nproc", 3)
    assert refused.exit_code == 2 and "is corrupt: its sha256 is" in refused.stderr, refused.output
    trusted = run("run", export, "--nproc", 3, "--no-verify")
    assert trusted.exit_code == 2 and trusted.stderr.strip() == (
        f"error: {export} was exported for 2 ranks: pass --nproc 2, or export again with --world-size 3")


@pytest.mark.slow
@pytest.mark.parametrize("flags, held", [(["--batch", "100000000"], "weights, activations"),
                                         (["--seq", "20000", "--train"], "weights, gradients, AdamW state, activations")])
def test_a_step_too_large_for_memory_is_refused_by_the_ranks(dist2, flags, held):
    """Only a rank knows its device (a GPU's free memory, or its share of this machine's): each checks its step's
    lower bound before joining the others, and the launcher says it once."""
    done = subprocess.run([sys.executable, "-m", "moeify.cli", "run", str(dist2), "--steps", "1", *flags],
                          capture_output=True, text=True, cwd=ROOT, timeout=150,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(rf"error: rank \d: one step of this rank needs at least [\d,.]+ GiB \({held}\) but [\d,.]+ "
                        r"GiB of memory per rank is available: lower --batch or --seq", done.stderr.strip()), done.stderr
