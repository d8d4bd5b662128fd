"""File I/O with clean refusals: the JSON reader, atomic writes (a temporary sibling renamed), tokenizer copies."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from moeify.checkpoint.temporaries import clean_leftovers, remove_path, temp_prefix
from moeify.errors import MoeifyError, opt


def read_json(path: str | Path, *, fix: str, what: str = "", expect: type = dict) -> Any:
    """JSON from `path`, or a MoeifyError naming `fix` when it is missing, unreadable or of the wrong type.

    `what` names the file for the missing case ("plan", "load file"); `expect` is the top-level type.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise MoeifyError(f"{label} is a directory, not a JSON file: {fix}")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoeifyError(f"{label} does not exist: {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeifyError(f"{path} is not valid JSON ({e}): {fix}") from None
    except OSError as e:
        raise MoeifyError(f"{path} cannot be read ({e.strerror}): {fix}") from None
    if not isinstance(data, expect):
        kinds = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
                 bool: "a boolean", type(None): "null"}
        raise MoeifyError(f"{path} holds {kinds.get(type(data), type(data).__name__)}, "
                          f"not {kinds.get(expect, expect.__name__)}: {fix}")
    return data


def indexed_shards(index: Path) -> list[str]:
    """The shard file names a `*.safetensors.index.json` maps its tensors to, each a file beside the index."""
    weight_map = read_json(index, fix="re-save the model").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise MoeifyError(f"{index} has no weight_map of tensor names to file names: re-save the model")
    names = sorted(set(weight_map.values()))
    # A shard is a file beside the index, never a path elsewhere ("../x", "/etc/x").
    outside = [name for name in names if Path(name).name != name or name in ("", ".", "..")]
    if outside:
        raise MoeifyError(f"{index} names {outside[0]!r}, not a file beside it: re-save the model")
    return names


def safetensors_header(path: Path) -> dict | None:
    """The JSON header of a safetensors file, or None when the file is not one (empty, cut, another format)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8 or 8 + int.from_bytes(head, "little") > size:
                return None
            header = json.loads(f.read(int.from_bytes(head, "little")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


# Files of a tokenizer that transformers reads from a model directory; copied as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "spiece.model", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja")


def copy_tokenizer(source: Path | None, target: Path) -> list[str]:
    """Copy the tokenizer files of directory `source` (if any) into `target`; returns their names."""
    if source is None or not Path(source).is_dir():
        return []
    names = [n for n in TOKENIZER_FILES if (Path(source) / n).is_file()]
    for name in names:
        shutil.copyfile(Path(source) / name, target / name)
    return names


def check_file_writable(path: Path | None, force: bool) -> None:
    """Fail early, before any work, when output `path` exists and --force was not given. Leftover temporaries of
    `path` from a killed moeify process go first (clean_leftovers), so a previous output they held counts."""
    if path is not None:
        clean_leftovers(Path(path))
    if path is not None and path.exists() and not force:
        raise MoeifyError(f"{path} already exists: pass {opt('force', True)} to replace it, or choose another path")


def check_not_inside(out: Path, source: Path) -> None:
    """Refuse an output directory that is `source` or lies inside it, or that holds `source`: replacing it would
    delete the input that is being read, and a conversion would write into the model it converts."""
    out_real, source_real = Path(out).resolve(), Path(source).resolve()
    if out_real == source_real:
        raise MoeifyError(f"-o {out} is the source directory {source}: choose an output path outside it")
    if source_real in out_real.parents:
        raise MoeifyError(f"-o {out} lies inside the source directory {source}: choose an output path outside it")
    if out_real in source_real.parents:
        raise MoeifyError(f"-o {out} holds the source directory {source}, which replacing it would delete: "
                          "choose another output path")


def make_output_dir(directory: Path, out: Path) -> Path:
    """mkdir -p `directory` for output `out`; a path that cannot be created (under /proc, read-only,
    a file in the way) is one line naming `out`, not a traceback."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(out, e) from None
    return directory


def cannot_write(out: Path, e: OSError) -> MoeifyError:
    """The one-line refusal of an output path the system will not let us create."""
    return MoeifyError(f"cannot write {out} ({e.strerror}): choose another output path")


def _umask() -> int:
    """The process's umask, read without changing it where /proc says it (os.umask alone must set it to read it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_permissions(directory: Path) -> None:
    """Give `directory` and everything in it the permissions mkdir and open would under the umask: mkdtemp makes
    0700 and safetensors' save_file 0600, which would keep a shared output from the rest of a team."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, names in os.walk(directory):
        for name in dirs + names:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # a link's target is not ours to change (os.walk does not enter it)
                executable = os.path.isdir(path) or os.stat(path).st_mode & 0o111
                os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def write_text_atomically(path: Path, text: str) -> None:
    """The whole file or nothing: write a temporary sibling, then rename it into place. The file gets the
    permissions open() would give (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    make_output_dir(path.parent, path)
    clean_leftovers(path)
    prefix, tmp = temp_prefix(path.name), None
    try:
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
            tmp = Path(name)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError as e:
            raise cannot_write(path, e) from None
        tmp.replace(path)
    except BaseException:
        _discard(tmp, path.parent, prefix)
        raise


def _discard(tmp: Path | None, parent: Path, prefix: str) -> None:
    """Remove a write's temporary. Without its name (an interrupt, such as SIGTERM raised by the CLI, that came as
    mkstemp or mkdtemp returned) remove what this process made under `prefix`: the prefix names this process and
    this output, so nothing else matches."""
    for leftover in [tmp] if tmp is not None else parent.glob(glob.escape(prefix) + "*.tmp"):
        with contextlib.suppress(OSError):
            remove_path(leftover)


def check_writable(out: Path, force: bool) -> None:
    """Fail early, before any work, when directory `out` exists and --force was not given."""
    check_file_writable(out, force)
    if out.exists() and not out.is_dir():
        raise MoeifyError(f"{out} exists and is not a directory: remove it or choose another -o")


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool = False, manifest: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block succeeds, with a moeify-manifest.json
    (integrity.py: every file's sha256 and size) unless `manifest` is False (an export that lists its files itself).

    On any failure (an exception, Ctrl-C, SIGTERM through the CLI) the temporary directory is removed, so no
    half-written output remains; a SIGKILL leaves it, named for its owner, and the next write to `out` removes it
    (clean_leftovers). The directory gets the permissions mkdir would give (0777 less the umask), not mkdtemp's 0700.
    """
    out = Path(out)
    check_writable(out, force)
    make_output_dir(out.parent, out)
    prefix, tmp, old = temp_prefix(out.name), None, None
    try:  # from before mkdtemp: an interrupt as it returns must not leave its directory behind
        try:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=out.parent))
        except OSError as e:
            raise cannot_write(out, e) from None
        old = tmp.with_name(tmp.name[:-len(".tmp")] + ".old")
        yield tmp
        if manifest:
            from moeify.checkpoint.integrity import write_manifest  # integrity reads JSON through this module

            write_manifest(tmp)
        _open_permissions(tmp)
        if out.exists() or out.is_symlink():
            out.rename(old)
        tmp.rename(out)
        if old.exists() or old.is_symlink():
            remove_path(old)
    except BaseException:
        if old is not None and old.exists() and not out.exists():  # interrupted between the two renames: the
            with contextlib.suppress(OSError):  # previous output returns
                old.rename(out)
        _discard(tmp, out.parent, prefix)
        raise
