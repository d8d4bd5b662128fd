"""Killed mid-write (SIGKILL at seeded random points, SIGTERM), every command leaves its previous output or none."""
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clitools import run
from tiny import tiny_t5

pytestmark = pytest.mark.slow

MOEIFY = [sys.executable, "-m", "moeify.cli"]
WORDS = "the router sends each token to one expert and capacity limits how many tokens one expert takes".split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny T5 directory (vocabulary large enough for byte tokens), its conversion, and a training text."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_t5("relu", seed=3, vocab_size=384).save_pretrained(root / "hf")
    assert run("convert", root / "hf", "--experts", 4, "--no-check", "-o", root / "m").exit_code == 0
    rng = random.Random(0)
    (root / "text.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)))
    return root


def commands(inputs: Path, out: Path) -> dict[str, list]:
    """The cheapest full run of each command that writes `out`, replacing it (--force)."""
    hf, m = inputs / "hf", inputs / "m"
    return {
        "convert": ["convert", hf, "--experts", 4, "--no-check", "--force", "-o", out],
        "onnx": ["export", m, "--target", "onnx", "--no-check", "--no-optimize", "--force", "-o", out],
        "torch-distributed": ["export", m, "--target", "torch-distributed", "--world-size", 2, "--force", "-o", out],
        "plan": ["plan", m, "--topology", "hgx-a100-4", "--force", "-o", out],
        "calibrate": ["calibrate", m, "--batches", 1, "--batch-size", 2, "--seq-len", 32, "--force", "-o", out],
        "train": ["train", m, "--text", inputs / "text.txt", "--steps", 2, "--seq-len", 32, "--batch-size", 4,
                  "--validation-batches", 1, "--eval-every", 0, "--save-every", 1, "--force", "-o", out],
    }


def temporaries(root: Path) -> list[str]:
    """moeify's temporaries anywhere under `root`, relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.moeify-*"))


def contents(path: Path) -> dict[str, object] | None:
    """Every file of output `path` (a file or a directory) by name, as equal for equal outputs; None when absent.

    A safetensors header's metadata comes out in a per-process order (a Rust HashMap), so headers compare parsed,
    and a torch-distributed manifest's sha256 entries compare as whether they match their files."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)) if p != path else p.name: canonical(p) for p in files}


def canonical(path: Path) -> object:
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8:8 + n]), data[8 + n:]
    if path.name == "manifest.json":
        manifest = json.loads(data)
        for name, entry in manifest["files"].items():
            entry["sha256"] = entry["sha256"] == hashlib.sha256((path.parent / name).read_bytes()).hexdigest()
        return manifest
    return data


def spawn(args, cwd: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(MOEIFY + [str(a) for a in args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True)


def wait_for_temporary(proc: subprocess.Popen, root: Path, timeout: float = 300) -> bool:
    """Poll until a moeify temporary exists under `root` (the write has begun); False if the process ended first."""
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        try:
            if temporaries(root):
                return True
        except FileNotFoundError:  # a temporary directory renamed or removed while the scan walked into it
            return True
        time.sleep(0.005)
    return False


def complete_checkpoints(run_dir: Path) -> None:
    """A train run killed at any point: run.json whole if there, and every visible checkpoint complete. (The run
    directory itself is not written atomically: it is created first, so that checkpoints can be resumed from.)"""
    if (run_dir / "run.json").exists():
        assert json.loads((run_dir / "run.json").read_text())["steps"] == 2
    for d in (run_dir / "checkpoints").glob("[!.]*") if (run_dir / "checkpoints").exists() else []:
        trainer = json.loads((d / "trainer.json").read_text())
        assert trainer["step"] in (1, 2) and (d / "moeify.json").is_file() and (d / "trainer.safetensors").is_file()


@pytest.mark.parametrize("name", ["convert", "onnx", "torch-distributed", "plan", "calibrate", "train"])
def test_sigkill_at_random_points_leaves_the_previous_output_and_the_next_run_cleans(inputs, tmp_path, name):
    rng = random.Random(f"kill-{name}")  # a fixed seed per command: the same kill points every run
    out = tmp_path / ("out.json" if name in ("plan", "calibrate") else "out")
    args = commands(inputs, out)[name]
    t0 = time.monotonic()
    prep = subprocess.run(MOEIFY + [str(a) for a in args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    runtime = time.monotonic() - t0  # the previous complete output, and how long a whole run takes here
    assert prep.returncode == 0, prep.stderr
    previous = contents(out)
    interrupted = 0
    # Mid-run (shorter again while a busy machine lets a run finish first), then late: the file write of plan and
    # calibrate, or the first temporary of a directory write and a moment after.
    delays = [rng.uniform(0.2, 0.5) * runtime / 2 ** retry for retry in range(4)] + [None]
    while delays:
        delay = delays.pop(0)
        proc = spawn(args, tmp_path)
        if delay is not None:
            time.sleep(delay)
        elif name in ("plan", "calibrate"):
            time.sleep(rng.uniform(0.6, 1.0) * runtime)
        else:
            wait_for_temporary(proc, tmp_path)
            time.sleep(rng.uniform(0, 0.005) * runtime)
        proc.kill()
        proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            interrupted += 1
            delays = [d for d in delays if d is None]  # no retry needed
        if name == "train":
            complete_checkpoints(out)
        else:  # the previous output (a replacement equals it), or none
            assert contents(out) in (None, previous)
    assert interrupted > 0  # at least one kill landed before the end: the test tested something

    # The next run on the same output, in this process (its pid is alive, the killed are not); train's --force
    # rebuilds its run directory whole, the others' first step removes the dead runs' temporaries.
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert temporaries(tmp_path) == []
    if name == "train":
        complete_checkpoints(out)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "step-1", "step-2"]
    else:
        assert contents(out) == previous


def test_sigterm_during_convert_removes_the_temporary_and_exits_143(tmp_path):
    out = tmp_path / "out"
    proc = spawn(["convert", "t5-tiny", "--experts", 4, "-o", out], tmp_path, stderr=subprocess.PIPE)
    assert wait_for_temporary(proc, tmp_path), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == ("terminated by SIGTERM: stopped before finishing, "
                                               "no output left half-written")
    assert list(tmp_path.iterdir()) == []
