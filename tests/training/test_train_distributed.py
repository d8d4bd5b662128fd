"""`moeify train --nproc N`: the same loss curve as one process, one gathered checkpoint, resume, clean refusals.

The runs compared compute the same thing: a T5 without dropout and --dropless (capacity is per rank
batch in the distributed layer). The load-balancing loss is on: the ranks take its f from the global
batch (moeify/training/rank_trainer.py), so it matches too.
"""
import csv
import json
import random

import pytest
import torch
from clitools import assert_user_error, run
from safetensors.torch import load_file

import moeify

pytestmark = pytest.mark.slow
WORDS = "the expert router sends each token to one feed forward network and the load balancing loss".split()
SAME = ("--seq-len", 32, "--batch-size", 4, "--validation-batches", 2, "--warmup", 5, "--lr", 3e-3, "--experts", 4,
        "--every", 1, "--dropless", "--log-every", 1, "--eval-every", 10)
TOL = dict(rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny local T5 without dropout (a byte vocabulary, as the t5-tiny preset) and a small corpus."""
    from transformers import T5Config, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("dist-train")
    torch.manual_seed(0)
    config = T5Config(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_heads=2, num_layers=2, dropout_rate=0.0,
                      feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(root / "t5")
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "."
                                               for _ in range(400)))
    return root


def train(setup, out, *args):
    return run("train", setup / "t5", "-o", out, "--text", setup / "corpus.txt", *SAME, *args)


def rows(out):
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def reference(setup):
    """One process, 20 steps."""
    out = setup / "single"
    result = train(setup, out, "--steps", 20)
    assert result.exit_code == 0, result.output
    return out


def assert_same_curve(a, b):
    ra, rb = rows(a), rows(b)
    assert list(ra[0]) == list(rb[0])  # the same columns, load_cv/<layer> included
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [str(s) for s in range(1, 21)]
    for x, y in zip(ra, rb):
        for column in ("train_loss", "aux_loss", "z_loss"):
            assert float(y[column]) == pytest.approx(float(x[column]), **TOL), (x["step"], column)
        assert (x["tokens"], x["lr"], bool(x["val_loss"])) == (y["tokens"], y["lr"], bool(y["val_loss"]))
        if x["val_loss"]:
            assert float(y["val_loss"]) == pytest.approx(float(x["val_loss"]), **TOL), x["step"]
        assert float(y["dropped_fraction"]) == float(x["dropped_fraction"]) == 0.0
        assert float(y["load_cv_mean"]) == pytest.approx(float(x["load_cv_mean"]), rel=1e-6)  # counts summed
    assert sum(1 for r in ra if r["val_loss"]) == 2


def test_two_ranks_follow_the_single_process_curve_through_a_resume(setup, reference):
    out = setup / "nproc2"
    first = train(setup, out, "--steps", 10, "--nproc", 2)
    assert first.exit_code == 0, first.output
    assert "training on 2 ranks (data parallel x expert parallel: 1 x 2)" in first.output
    assert "trained 10 steps, 1,280 tokens" in first.output
    trainer = json.loads((out / "checkpoints/step-10/trainer.json").read_text())
    assert trainer["distributed"] == {"nproc": 2, "expert_parallel": 2} and trainer["step"] == 10
    resumed = run("train", "-o", out, "--resume", "--steps", 20)  # on 2 ranks again: the run's own
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "trained 20 steps, 2,560 tokens" in resumed.output
    assert_same_curve(reference, out)
    assert not (out / ".nproc").exists()  # the export and the scratch are gone
    # One moeify directory, as the single process saves it: same files, moeify.json, tensors.
    single, gathered = reference / "checkpoints/step-20", out / "checkpoints/step-20"
    assert (gathered / "moeify.json").read_text() == (single / "moeify.json").read_text()
    wa, wb = load_file(single / "moeify-model.safetensors"), load_file(gathered / "moeify-model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape and wa[k].dtype == wb[k].dtype
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4, msg=k)


def test_a_dp2_by_ep2_mesh_on_four_ranks_follows_it_too(setup, reference):
    out = setup / "nproc4"
    result = train(setup, out, "--steps", 20, "--nproc", 4, "--expert-parallel", 2, "--eval-every", 10)
    assert result.exit_code == 0, result.output
    assert "training on 4 ranks (data parallel x expert parallel: 2 x 2)" in result.output
    assert_same_curve(reference, out)


def test_the_gathered_checkpoint_loads_and_trains_on_in_one_process(setup, tmp_path, reference):
    gathered = setup / "nproc2/checkpoints/step-20"
    if not gathered.is_dir():
        pytest.skip("needs the two-rank run of this module")
    model = moeify.load(gathered)
    assert len(moeify.layers.switch.switch_layers(model)) == 4
    out = tmp_path / "more"
    result = run("train", gathered, "-o", out, "--text", setup / "corpus.txt", "--seq-len", 32, "--batch-size", 4,
                 "--validation-batches", 1, "--steps", 2, "--log-every", 1)
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in rows(out)] == ["1", "2"]


@pytest.mark.parametrize("args,message", [
    (["--batch-size", 3, "--nproc", 2], "--batch-size 3 does not split over --nproc 2: use a multiple of 2"),
    (["--nproc", 0], "--nproc must be at least 1, got 0"),
    (["--nproc", 3, "--batch-size", 6, "--expert-parallel", 3],
     "--expert-parallel 3 cannot split 4 experts evenly"),
    (["--nproc", 4, "--expert-parallel", 3], "--expert-parallel 3 does not divide --nproc 4: use one of 1, 2, 4"),
    (["--expert-parallel", 2], "--expert-parallel sets the mesh of a distributed run: add --nproc N"),
    (["--dense", "--nproc", 2], "drop --dense or --nproc"),
])
def test_bad_meshes_exit_2_and_write_nothing(setup, tmp_path, args, message):
    source = ["--experts", 4] if "--dense" not in args else []
    result = run("train", setup / "t5", "-o", tmp_path / "out", "--text", setup / "corpus.txt", "--seq-len", 32,
                 *source, *args)
    assert_user_error(result, tmp_path, message)


def test_a_rank_user_error_is_the_launcher_one_line(tmp_path):
    from moeify.errors import MoeifyError
    from moeify.training.launch import _fail

    (tmp_path / "errors").mkdir()
    (tmp_path / "errors/rank-00000.json").write_text(json.dumps({"code": 3, "message": "lost contact"}))
    (tmp_path / "errors/rank-00001.json").write_text(json.dumps({"code": 2, "message": "rank 1: no space"}))
    with pytest.raises(MoeifyError, match="^rank 1: no space$"):
        _fail(tmp_path, 1)


def test_resume_keeps_the_run_mesh(tmp_path):
    result = run("train", "-o", tmp_path / "out", "--resume", "--nproc", 2)
    assert_user_error(result, tmp_path, "--resume continues with the run's saved options: drop --nproc")


def test_the_launcher_polls_while_the_ranks_run(tmp_path):
    """The CLI's progress bar follows rank 0's metrics.csv through this poll, about twice a second."""
    import sys

    from moeify.training.launch import POLL_S, _torchrun

    polls = []
    code, interrupted = _torchrun([sys.executable, "-c", f"import time; time.sleep({POLL_S * 3.5})"],
                                  tmp_path / "log", lambda: polls.append(1))
    assert (code, interrupted) == (0, False) and len(polls) >= 2


def test_sigterm_reaches_torchrun_before_the_launcher_cleans_up(tmp_path):
    """SLURM's and Kubernetes' SIGTERM goes on to torchrun (its own session), which stops the ranks; the launcher
    waits for it instead of removing the work directory under running ranks."""
    import os
    import signal
    import sys

    from moeify.training.launch import _torchrun

    ready, got = tmp_path / "ready", tmp_path / "got"
    child = (f"import pathlib, signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(got)!r}).write_text('TERM'), sys.exit(0)))\n"
             f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)\n")
    sent = []

    def poll():
        if ready.exists() and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # to the launcher, as a scheduler would

    previous = signal.getsignal(signal.SIGTERM)
    code, interrupted = _torchrun([sys.executable, "-c", child], tmp_path / "log", poll)
    assert (code, interrupted) == (0, True) and got.read_text() == "TERM"
    assert signal.getsignal(signal.SIGTERM) == previous  # the launcher's handler is gone again
