"""manifest.json of a torch-distributed export: every file with its sha256, and each rank's experts."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeify.checkpoint.files import read_json
from moeify.checkpoint.integrity import sha256_file, skipped, written_digest
from moeify.checkpoint.schemas import MANIFEST_FORMAT as FORMAT
from moeify.checkpoint.schemas import MANIFEST_VERSION as VERSION
from moeify.checkpoint.schemas import validate
from moeify.errors import MoeifyError

MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.json"


@dataclass
class RankShard:
    rank: int
    file: str
    experts: dict[str, list[int]]  # layer name -> global expert ids held, ascending


@dataclass
class Manifest:
    world_size: int
    files: dict[str, dict]  # file name -> {"sha256": hex, "bytes": n}
    ranks: list[RankShard]
    source: dict = field(default_factory=dict)  # what was exported: moeify.json's source

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> "Manifest":
        """A manifest read from `where`, its schema checked (checkpoint/schemas.py)."""
        validate(MANIFEST_FILE, data, where)
        return cls(world_size=data["world_size"], files=data["files"], ranks=[RankShard(**r) for r in data["ranks"]],
                   source=data.get("source", {}))


def describe(directory: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"sha256", "bytes"}} for files of `directory`, as the manifest lists them; a shard's digest is the
    one taken right after it was written (integrity.remember)."""
    return {n: {"sha256": written_digest(directory / n), "bytes": (directory / n).stat().st_size} for n in names}


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=1))


def read_export_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if directory.exists() and not directory.is_dir():
        raise MoeifyError(f"{directory} is a file, not a torch-distributed export directory: pass the directory "
                          "`moeify export MODEL --target torch-distributed -o DIR` wrote")
    if not directory.is_dir():
        raise MoeifyError(f"{directory} does not exist: export a model first with "
                          f"`moeify export MODEL --target torch-distributed -o {directory}`")
    if not path.is_file():
        raise MoeifyError(f"{directory} is not a torch-distributed export (no {MANIFEST_FILE}): "
                          "make one with `moeify export MODEL --target torch-distributed`")
    return Manifest.from_dict(read_json(path, fix="re-run `moeify export`"), path)


def verify(directory: str | Path, manifest: Manifest, names: list[str]) -> None:
    """Refuse any of `names` that is missing or whose sha256 differs from the manifest's."""
    directory = Path(directory)
    for name in names:
        entry = manifest.files.get(name)
        if entry is None:
            raise MoeifyError(f"{directory / MANIFEST_FILE} does not list {name}: re-run `moeify export`")
        path = directory / name
        if not path.is_file():
            raise MoeifyError(f"{path} is missing: copy the whole export directory, or re-run `moeify export`")
        if skipped():  # --no-verify: present is enough
            continue
        got = sha256_file(path)
        if got != entry["sha256"]:
            raise MoeifyError(f"{path} is corrupt: its sha256 is {got[:16]}..., the manifest says "
                              f"{entry['sha256'][:16]}...: copy it again or re-run `moeify export`")
