"""moeify-manifest.json: the sha256 and size of every file of an output directory, written with it, verified on read."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from moeify.checkpoint.files import read_json
from moeify.checkpoint.schemas import INTEGRITY_FORMAT, INTEGRITY_VERSION, validate
from moeify.errors import MoeifyError, opt

MANIFEST_FILE = "moeify-manifest.json"
CHUNK = 1 << 22  # 4 MiB reads: hashing never holds a whole file in memory
# Files moeify reads as a model or its description: one of these that the manifest does not list was put there
# later (a stale shard, a changed config), so the directory is no longer the one written. Other files (a README,
# a tokenizer copied in to calibrate with) are left alone. Literal names: the modules that define them import torch
# or are not on tests/test_layering.py's torch-free list.
READ_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".safetensors.index.json")
READ_NAMES = frozenset({"moeify.json", "trainer.json", "config.json"})

# Digests taken by the writers right after they wrote a file (see remember()), keyed by what identifies that
# version of the file: write_manifest takes them instead of reading the file again. Only writers add entries, for
# files in their own temporary directory, and readers never consult them: a verification always reads the bytes.
_written: dict[tuple[int, int, int, int], str] = {}
# Set by unverified(): the CLI's --no-verify reaches every reader a command calls without a keyword on each.
_skipping = contextvars.ContextVar("moeify_unverified", default=False)


@contextlib.contextmanager
def unverified(skip: bool = True) -> Iterator[None]:
    """Within the block (when `skip`), every Verifier passes without hashing: trusted files, or very large ones."""
    token = _skipping.set(skip)
    try:
        yield
    finally:
        _skipping.reset(token)


def skipped() -> bool:
    """Whether the current command runs with --no-verify (within `unverified`)."""
    return _skipping.get()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _key(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def remember(path: Path) -> str:
    """Hash a file its writer has just written, while its pages are still cached, so that the manifest does not
    read it again once later files have pushed it out of memory. The bytes come from the page cache, not from the
    writer's buffers (safetensors writes them from Rust): the cost is one pass over memory, not over the disk."""
    if len(_written) > 4096:  # a long training run writes many checkpoints: keep only recent digests
        _written.clear()
    digest = sha256_file(path)
    _written[_key(os.stat(path))] = digest
    return digest


def written_digest(path: Path) -> str:
    """The sha256 of a file an output is being written with: remember()'s if the file is unchanged since, else
    read now."""
    return _written.get(_key(os.stat(path))) or sha256_file(path)


def _files(directory: Path) -> list[str]:
    """Every file under `directory` but the manifest, as sorted relative POSIX paths."""
    names = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            rel = Path(root, name).relative_to(directory).as_posix()
            if rel != MANIFEST_FILE:
                names.append(rel)
    return sorted(names)


def write_manifest(directory: Path) -> dict[str, dict]:
    """Write `directory`/moeify-manifest.json listing every other file with its sha256 and size; returns the
    entries. files.atomic_directory calls it on every output just before the rename."""
    directory = Path(directory)
    entries = {}
    for name in _files(directory):
        entries[name] = {"sha256": written_digest(directory / name), "size": (directory / name).stat().st_size}
    data = {"format": INTEGRITY_FORMAT, "version": INTEGRITY_VERSION, "files": entries}
    (directory / MANIFEST_FILE).write_text(json.dumps(data, indent=1))
    return entries


def read_manifest(directory: Path) -> dict[str, dict] | None:
    """The manifest's {file: {"sha256", "size"}}, schema-checked; None for a directory written before moeify wrote
    manifests, which is read unverified, as it always was."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    return validate(MANIFEST_FILE, read_json(path, fix="write the directory again"), path)["files"]


def _refuse(path: Path, problem: str) -> MoeifyError:
    return MoeifyError(f"{path}: {problem} {MANIFEST_FILE}: the file was changed or corrupted; write it again "
                       f"(`moeify convert`/`export`), or pass {opt('verify', False)} for trusted files")


class Verifier:
    """One directory's manifest, checked file by file: a reader hashes each file just before it loads it, so that
    the load reads the bytes back from the page cache instead of the disk."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.entries = None if _skipping.get() else read_manifest(self.directory)  # None: nothing to check
        self.checked: set[str] = set()

    def check_listing(self) -> None:
        """Refuse a listed file that is missing, and a file moeify reads that the manifest does not list."""
        if self.entries is None:
            return
        for name in self.entries:
            if not (self.directory / name).is_file():
                raise MoeifyError(f"{self.directory / name} is missing, but {MANIFEST_FILE} lists it: copy the "
                                  "whole directory again, or write it again")
        for name in _files(self.directory):
            if name not in self.entries and (name.rpartition("/")[2] in READ_NAMES or name.endswith(READ_SUFFIXES)):
                raise MoeifyError(f"{self.directory / name} is not listed in {MANIFEST_FILE}: it was added after "
                                  "moeify wrote the directory; remove it, or write the directory again")

    def check(self, name: str | Path) -> None:
        """Refuse file `name` (relative to the directory, or a path inside it) unless its size and sha256 are the
        manifest's. Each file is hashed once."""
        if self.entries is None:
            return
        given = Path(name)
        rel = (given.relative_to(self.directory) if given.is_relative_to(self.directory) else given).as_posix()
        path = self.directory / rel
        if rel in self.checked:
            return
        entry = self.entries.get(rel)
        if entry is None:
            raise MoeifyError(f"{path} is not listed in {MANIFEST_FILE}: it was added after moeify wrote the "
                              "directory; remove it, or write the directory again")
        size = path.stat().st_size
        if size != entry["size"]:
            raise _refuse(path, f"{size} bytes, {entry['size']} in")
        if sha256_file(path) != entry["sha256"]:
            raise _refuse(path, "sha256 differs from")
        self.checked.add(rel)

    def check_all(self, skip=lambda name: False) -> None:
        """The listing, then every listed file but those `skip` (name) leaves to check() at their load."""
        self.check_listing()
        for name in sorted(self.entries or {}):
            if not skip(name):
                self.check(name)


def verify(directory: str | Path) -> None:
    """Refuse a directory whose files differ from its moeify-manifest.json, naming the first that does; a directory
    without a manifest passes (older moeify wrote none)."""
    Verifier(directory).check_all()
