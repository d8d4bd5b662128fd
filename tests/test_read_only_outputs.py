"""Outputs under a read-only directory: one line naming the path and the fix, exit status 2, nothing created."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import run

# Mount an empty read-only tmpfs on the directory ($0) in a private mount namespace, then run the command ("$@").
# Root ignores file modes, so for root only a read-only file system makes a directory truly unwritable.
MOUNT = 'mount -t tmpfs -o ro none "$0" && exec "$@"'


def mount_works(directory: Path) -> bool:
    """Whether this machine lets us mount a read-only tmpfs in a user and mount namespace (unshare -rm)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT, str(directory), "touch", str(directory / "p")],
                           capture_output=True, text=True)
    return probe.returncode != 0 and "Read-only file system" in probe.stderr


@pytest.fixture(scope="module")
def model(switch_t5_tiny):
    return switch_t5_tiny


@pytest.fixture
def read_only(tmp_path):
    """(a read-only directory, how to run the CLI with it read-only, the reason the error names)."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() == 0:
        if not mount_works(directory):
            pytest.skip("root ignores file modes, and unshare -rm cannot mount a read-only tmpfs here")

        def invoke(*args):
            done = subprocess.run(["unshare", "-rm", "sh", "-c", MOUNT, str(directory), sys.executable, "-m",
                                   "moeify.cli", *map(str, args)], capture_output=True, text=True, timeout=300)
            return done.returncode, done.stdout, done.stderr

        yield directory, invoke, "Read-only file system"
        return
    directory.chmod(0o555)

    def invoke(*args):
        result = run(*args)
        return result.exit_code, result.stdout, result.stderr

    yield directory, invoke, "Permission denied"
    directory.chmod(0o755)  # so that pytest can remove it


COMMANDS = {
    "convert": ["convert", "t5-tiny", "--experts", 2, "--no-check"],
    "plan": ["plan", "MODEL", "--topology", "hgx-a100-4"],
    "calibrate": ["calibrate", "MODEL", "--batches", 1, "--batch-size", 1, "--seq-len", 8],
    "export torch": ["export", "MODEL", "--target", "torch"],
    "export onnx": ["export", "MODEL", "--target", "onnx"],
    "export torch-distributed": ["export", "MODEL", "--target", "torch-distributed", "--world-size", 2],
}


@pytest.mark.parametrize("below", ["out", "a/b/out"])  # in the read-only directory, or in folders not made yet
@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_read_only_directory_is_one_line_and_nothing(model, read_only, tmp_path, command, below):
    directory, invoke, reason = read_only
    out = directory / (below + (".json" if command in ("plan", "calibrate") else ""))
    before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = invoke(*[model if a == "MODEL" else a for a in COMMANDS[command]], "-o", out)
    assert code == 2, stderr
    assert stderr.splitlines() == [f"error: cannot write {out} ({reason}): choose another output path"]
    assert not stdout  # refused before any work, not after it
    assert sorted(tmp_path.rglob("*")) == before  # nothing created, no temporary left beside the directory
