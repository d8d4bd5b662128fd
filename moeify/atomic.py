"""Write outputs atomically: build a file or directory beside the target, then rename into place."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import MoeifyError


def check_file_writable(path: Path | None, force: bool) -> None:
    """Fail early, before any work, when output `path` exists and --force was not given."""
    if path is not None and path.exists() and not force:
        raise MoeifyError(f"{path} already exists: pass --force to replace it, or choose another path")


def write_text_atomically(path: Path, text: str) -> None:
    """The whole file or nothing: write a temporary sibling, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def check_writable(out: Path, force: bool) -> None:
    """Fail early, before any work, when directory `out` exists and --force was not given."""
    check_file_writable(out, force)
    if out.exists() and not out.is_dir():
        raise MoeifyError(f"{out} exists and is not a directory: remove it or choose another -o")


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block succeeds.

    On any failure the temporary directory is removed, so no half-written output remains.
    """
    out = Path(out)
    check_writable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{tmp.name}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
