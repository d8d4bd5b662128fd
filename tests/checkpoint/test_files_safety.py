"""Outputs get umask permissions, a killed process's temporaries are cleaned, -o never overlaps SOURCE; SIGTERM."""
import os
import signal
import subprocess
import sys

import pytest
from clitools import run

from moeify.checkpoint import files, temporaries
from moeify.checkpoint.files import atomic_directory, write_text_atomically
from moeify.checkpoint.temporaries import clean_leftovers


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path):
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_real_convert_gets_the_permissions_of_mkdir_and_open(hf_t5_dir, tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "out"
    result = run("convert", hf_t5_dir, "--experts", 2, "--no-check", "-o", out)
    assert result.exit_code == 0, result.output
    assert mode(out) == 0o777 & ~mask  # mkdtemp's 0700 before
    assert {p.name: mode(p) for p in out.iterdir()} == {"moeify.json": 0o666 & ~mask,
                                                       "moeify-model.safetensors": 0o666 & ~mask,
                                                       "moeify-manifest.json": 0o666 & ~mask}
    again = run("convert", hf_t5_dir, "--experts", 2, "--no-check", "--force", "-o", out)
    assert again.exit_code == 0 and mode(out) == 0o777 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_an_atomic_file_gets_the_permissions_of_open(tmp_path, umask, mask):
    umask(mask)
    write_text_atomically(tmp_path / "plan.json", "{}")
    assert mode(tmp_path / "plan.json") == 0o666 & ~mask  # mkstemp's 0600 otherwise
    assert os.listdir(tmp_path) == ["plan.json"]


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(parent, name, pid, kind="tmp", host=None, start=None, random="abc_12"):
    host = host or temporaries._host()
    start = temporaries._start_time(pid) if start is None else start
    return parent / f".{name}.moeify-{host}-{pid}-{start}-{random}.{kind}"


def test_a_dead_process_s_temporaries_of_the_same_output_are_removed_and_nothing_else(tmp_path):
    pid = dead_pid()
    mine = leftover(tmp_path, "out", pid, start=4242)
    mine.mkdir()
    (mine / "moeify-model.safetensors").write_bytes(b"half")
    half_file = leftover(tmp_path, "out", pid, random="x9y8")
    half_file.write_text("{")
    keep = [leftover(tmp_path, "out", os.getpid()),  # a live writer
            leftover(tmp_path, "other", pid),  # another output
            leftover(tmp_path, "out", pid, host="0123abcd"),  # another machine's process on a shared disk
            tmp_path / ".out.tmp", tmp_path / ".out.abc.tmp"]  # not named by moeify's scheme
    for p in keep:
        p.mkdir()
    assert sorted(clean_leftovers(tmp_path / "out")) == sorted([mine, half_file])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


def test_a_recycled_pid_does_not_keep_a_temporary_alive(tmp_path):
    recycled = leftover(tmp_path, "out", os.getpid(), start=temporaries._start_time(os.getpid()) + 1)
    recycled.mkdir()
    assert clean_leftovers(tmp_path / "out") == [recycled]


def test_the_next_atomic_write_cleans_and_a_moved_aside_output_comes_back(tmp_path, capsys):
    pid = dead_pid()
    old = leftover(tmp_path, "out", pid, kind="old")  # killed between moving out aside and renaming the new one
    old.mkdir()
    (old / "moeify.json").write_text("previous")
    new = leftover(tmp_path, "out", pid)
    new.mkdir()
    nested = leftover(tmp_path, new.name, pid)  # a checkpoint's inner save names its temporary after the outer
    nested.mkdir()
    with pytest.raises(files.MoeifyError, match="already exists"):  # the previous output is back: no --force, no write
        with atomic_directory(tmp_path / "out"):
            pass
    assert "note: restored" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "moeify.json").read_text() == "previous"
    stale = leftover(tmp_path, "out", pid, kind="old", random="zz")
    stale.mkdir()
    with atomic_directory(tmp_path / "out", force=True) as tmp:
        (tmp / "moeify.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "moeify.json").read_text() == "new"


def test_write_text_atomically_cleans_its_own_leftovers_and_keeps_no_temporary_on_failure(tmp_path, monkeypatch):
    stale = leftover(tmp_path, "plan.json", dead_pid())
    stale.write_text("{")
    write_text_atomically(tmp_path / "plan.json", "{}")
    assert os.listdir(tmp_path) == ["plan.json"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "chmod", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(tmp_path / "plan.json", "[]")
    assert os.listdir(tmp_path) == ["plan.json"] and (tmp_path / "plan.json").read_text() == "{}"


def test_an_interrupted_swap_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("previous")
    real_rename = type(out).rename

    def fail_second(self, target):  # the old output moved aside, then the new one cannot move in
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(type(out), "rename", fail_second)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "a").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "a").read_text() == "previous"


@pytest.fixture
def converted_dir(hf_t5_dir, tmp_path):
    out = tmp_path / "m"
    assert run("convert", hf_t5_dir, "--experts", 2, "--no-check", "-o", out).exit_code == 0
    return out


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {message}"]


def test_convert_refuses_an_output_that_is_or_lies_inside_the_source(hf_t5_dir, tmp_path):
    before = sorted(p.name for p in hf_t5_dir.iterdir())
    one_line_error(run("convert", hf_t5_dir, "--experts", 2, "--force", "-o", hf_t5_dir),
                   f"-o {hf_t5_dir} is the source directory {hf_t5_dir}: choose an output path outside it")
    inside = hf_t5_dir / "switch"
    one_line_error(run("convert", hf_t5_dir, "--experts", 2, "-o", inside),
                   f"-o {inside} lies inside the source directory {hf_t5_dir}: choose an output path outside it")
    one_line_error(run("convert", hf_t5_dir, "--experts", 2, "--force", "-o", tmp_path),
                   f"-o {tmp_path} holds the source directory {hf_t5_dir}, which replacing it would delete: "
                   "choose another output path")
    assert sorted(p.name for p in hf_t5_dir.iterdir()) == before


@pytest.mark.parametrize("target", ["torch-distributed", "onnx"])
def test_export_refuses_an_output_that_is_or_lies_inside_the_source(converted_dir, target):
    before = sorted(p.name for p in converted_dir.iterdir())
    extra = ["--world-size", 2] if target == "torch-distributed" else []
    one_line_error(run("export", converted_dir, "--target", target, *extra, "--force", "-o", converted_dir),
                   f"-o {converted_dir} is the source directory {converted_dir}: choose an output path outside it")
    inside = converted_dir / "x"
    one_line_error(run("export", converted_dir, "--target", target, *extra, "-o", inside),
                   f"-o {inside} lies inside the source directory {converted_dir}: choose an output path outside it")
    assert sorted(p.name for p in converted_dir.iterdir()) == before


def test_sigterm_mid_save_exits_143_with_one_line_and_leaves_nothing(hf_t5_dir, tmp_path, monkeypatch):
    import safetensors.torch

    real = safetensors.torch.save_file

    def terminated(*a, **k):  # SIGTERM arrives while the weights are being written
        real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(safetensors.torch, "save_file", terminated)
    before = signal.getsignal(signal.SIGTERM)
    result = run("convert", hf_t5_dir, "--experts", 2, "--no-check", "-o", tmp_path / "out")
    assert result.exit_code == 143, result.output
    assert result.stderr.strip().splitlines() == [
        "terminated by SIGTERM: stopped before finishing, no output left half-written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-t5"]
    assert signal.getsignal(signal.SIGTERM) == before  # the CLI's handler is not left behind


def test_a_killed_process_not_yet_reaped_counts_as_dead(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        zombie = leftover(tmp_path, "out", proc.pid)
        zombie.mkdir()
        assert clean_leftovers(tmp_path / "out") == []  # alive: its temporary stays
        proc.kill()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # dead, still a zombie: not reaped
        assert clean_leftovers(tmp_path / "out") == [zombie]
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_during_training_stops_at_once_like_a_second_ctrl_c(tmp_path, monkeypatch):
    from tiny import tiny_t5

    from moeify.checkpoint import store

    save = store.save

    def save_then_sigterm(model, path, **kw):  # step 2's checkpoint: weights written, trainer.json not yet
        save(model, path, **kw)
        if path.name.startswith(".step-2."):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(store, "save", save_then_sigterm)
    tiny_t5("relu", vocab_size=384).save_pretrained(tmp_path / "hf")
    (tmp_path / "text.txt").write_text("the router sends each token to one expert.\n" * 200)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    result = run("train", tmp_path / "hf", "--experts", 2, "--text", tmp_path / "text.txt", "--steps", 4,
                 "--save-every", 1, "--eval-every", 0, "--seq-len", 32, "--batch-size", 4, "--validation-batches", 1,
                 "-o", out)
    assert result.exit_code == 130, result.output
    assert result.stderr == (f"stopped at once: the last complete checkpoint is {out / 'checkpoints' / 'step-1'}; "
                             f"continue with moeify train -o {out} --resume\n")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # step 2's temporary is gone
    assert signal.getsignal(signal.SIGTERM) == before


@pytest.mark.parametrize("write", ["file", "directory"])
def test_an_interrupt_as_the_temporary_is_created_leaves_nothing(monkeypatch, tmp_path, write):
    """The CLI raises SIGTERM as an exception, which can land the moment mkstemp / mkdtemp returns, before the writer
    holds the temporary's name: it is removed all the same (a full-suite run once left one behind)."""
    for name in ("mkstemp", "mkdtemp"):
        def interrupted(*args, _real=getattr(files.tempfile, name), **kwargs):
            made = _real(*args, **kwargs)
            if isinstance(made, tuple):  # mkstemp's (fd, path)
                os.close(made[0])
            raise KeyboardInterrupt
        monkeypatch.setattr(files.tempfile, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        if write == "file":
            write_text_atomically(tmp_path / "plan.json", "{}")
        else:
            with atomic_directory(tmp_path / "out"):
                pass
    assert list(tmp_path.iterdir()) == []
