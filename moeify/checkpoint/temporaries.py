"""The owner-named temporaries of atomic writes, and the cleaning of what a killed owner left behind."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import sys
from pathlib import Path

# Temporaries name their owner: ".NAME.moeify-HOST-PID-START-RANDOM.tmp" (being written) and ".old" (the previous
# output moved aside for the instant of the swap), HOST a hash of the host name and START the process's start time
# (clock ticks after boot, 0 where /proc is missing). A process killed by SIGKILL (or the OOM killer, or a lost
# node) runs no cleanup, so the next write to the same NAME removes what a dead owner left: the PID tells whether
# the owner lives, START whether that PID is still the owner and not a recycled one, HOST whether the PID can be
# asked at all (on a shared file system another machine's temporaries are left alone).
_TAG = "moeify"


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _proc_stat(pid: int) -> tuple[str, int]:
    """The process's state and start time from /proc/PID/stat (fields 3 and 22, after the parenthesised name);
    ("?", 0) if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return "?", 0


def _start_time(pid: int) -> int:
    return _proc_stat(pid)[1]


def temp_prefix(name: str) -> str:
    return f".{name}.{_TAG}-{_host()}-{os.getpid()}-{_start_time(os.getpid())}-"


def _leftover_pattern(name: str) -> re.Pattern:
    # mkstemp and mkdtemp draw the random part from [a-z0-9_]
    return re.compile(rf"\.{re.escape(name)}\.{_TAG}-([0-9a-f]{{8}})-(\d+)-(\d+)-[a-z0-9_]+\.(tmp|old)")


def _owner_alive(host: str, pid: int, start: int) -> bool:
    """Whether the process that named a temporary may still be writing it (in doubt: yes)."""
    if host != _host() or pid <= 0:
        return True  # another machine's process, which we cannot ask
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except (OverflowError, OSError):
        return True
    state, now = _proc_stat(pid)
    if state in ("Z", "X"):
        return False  # killed, not yet reaped by its parent
    return start == 0 or now == 0 or now == start  # a different start time: the pid was recycled


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_leftovers(out: Path) -> list[Path]:
    """Remove the temporaries of output `out` (see _TAG) whose moeify process is dead, quietly; returns them.

    Nothing else is touched: not other names, not a live process's temporaries, not another host's. A previous
    output moved aside (".old") by a process killed between its two renames is put back when `out` is missing
    (one note on stderr says so); otherwise it is removed with the rest."""
    out = Path(out)
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    pattern = _leftover_pattern(out.name)
    removed, moved_aside = [], []
    for entry in sorted(entries):
        m = pattern.fullmatch(entry.name)
        if not m or _owner_alive(m[1], int(m[2]), int(m[3])):
            continue
        if m[4] == "old":
            moved_aside.append(entry)
            continue
        clean_leftovers(entry)  # a nested atomic write (a checkpoint's save) names its temporaries after this one
        remove_path(entry)
        removed.append(entry)
    for old in moved_aside:
        if out.exists() or out.is_symlink():
            remove_path(old)
            removed.append(old)
            continue
        try:
            old.rename(out)
        except OSError:
            continue  # left as it is: a previous output is never removed while `out` is missing
        print(f"note: restored {out}, which a killed moeify process had moved aside", file=sys.stderr)
    return removed
