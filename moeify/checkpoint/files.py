"""File I/O with clean refusals: the JSON reader, atomic writes (a temporary sibling renamed), tokenizer copies."""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

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
    """Fail early, before any work, when output `path` exists and --force was not given."""
    if path is not None and path.exists() and not force:
        raise MoeifyError(f"{path} already exists: pass {opt('force', True)} to replace it, or choose another path")


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


def write_text_atomically(path: Path, text: str) -> None:
    """The whole file or nothing: write a temporary sibling, then rename it into place."""
    path = Path(path)
    make_output_dir(path.parent, path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
    except OSError as e:
        raise cannot_write(path, e) from None
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
    make_output_dir(out.parent, out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise cannot_write(out, e) from None
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
