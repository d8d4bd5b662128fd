"""Training text (the standard library's source, a file or directory, or JSONL), split by document, tokenised."""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from moeify.conversion.text import read_text, stdlib_files
from moeify.errors import MoeifyError, opt
from moeify.training.config import VALIDATION_FRACTION
from moeify.training.tokens import Tokens

SNIFF_BYTES = 8000  # a file with a NUL byte in its first 8000 bytes is binary and skipped (git's rule)


@dataclass(frozen=True)
class Document:
    name: str  # a path relative to the source, or "FILE:LINE" for a JSONL line
    text: str


@dataclass(frozen=True)
class Source:
    """Where the text came from, in the words the CLI prints, and its documents in a fixed order."""

    name: str
    unit: str  # what a document is: "file" or "line"
    documents: list[Document]


@dataclass(frozen=True)
class Split:
    name: str  # "train" or "validation"
    documents: int
    bytes: int  # UTF-8 bytes of its text
    ids: torch.Tensor  # the token stream: its documents in source order, each followed by EOS when there is one

    @property
    def tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Corpus:
    source: str
    unit: str  # Source.unit
    tokenizer: str  # Tokens.name
    train: Split
    validation: Split

    def describe(self) -> list[str]:
        """What the CLI prints: the source, then one line per split."""
        return [f"text: {self.source} ({self.tokenizer} tokens)"] + [
            f"{s.name}: {s.documents:,} {self.unit}{'' if s.documents == 1 else 's'}, {s.bytes:,} bytes, "
            f"{s.tokens:,} tokens"
            for s in (self.train, self.validation)]


def read_source(text: Path | None = None, data: Path | None = None) -> Source:
    """The documents of `data` (JSONL), or of `text` (a file, or a directory's text files recursively,
    sorted), or of the standard library's top-level .py files when neither is given."""
    if text is not None and data is not None:
        raise MoeifyError(f"give {opt('text')} or {opt('data')}, not both")
    if data is not None:
        return Source(str(data), "line", _jsonl(Path(data)))
    if text is None:
        files = stdlib_files()
        root = files[0].parent if files else Path(".")
        return Source(f"Python {sys.version_info.major}.{sys.version_info.minor} standard library ({root})",
                      "file", [Document(f.name, read_text(f)) for f in files])
    path = Path(text)
    if not path.exists():
        raise MoeifyError(f"{opt('text', str(text))} does not exist: give a UTF-8 text file or a directory of them")
    if path.is_file():
        return Source(str(path), "file", [Document(path.name, _read(path))])
    # Hidden files and folders (.git, .venv) are tooling, not the user's text.
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return Source(str(path), "file", [Document(str(p.relative_to(path)), _read(p)) for p in files if _is_text(p)])


def _read(path: Path) -> str:
    try:
        return read_text(path)  # non-UTF-8 bytes become U+FFFD (errors="replace"), never a refusal
    except OSError as e:
        raise MoeifyError(f"{path} cannot be read ({e.strerror}): give a readable UTF-8 text file") from None


def _is_text(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return b"\0" not in f.read(SNIFF_BYTES)
    except OSError as e:
        raise MoeifyError(f"{path} cannot be read ({e.strerror}): give a readable UTF-8 text file") from None


def _jsonl(path: Path) -> list[Document]:
    if not path.exists():
        raise MoeifyError(f"{opt('data', str(path))} does not exist: give a JSONL file with one "
                          '{"text": "..."} object per line')
    if path.is_dir():
        raise MoeifyError(f"{opt('data', str(path))} is a directory: give one JSONL file, or the directory "
                          f"as {opt('text')}")
    documents = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at.
    for number, line in enumerate(_read(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoeifyError(f"{path} line {number} is not JSON ({e.msg}): each line must be an object like "
                              '{"text": "..."}') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise MoeifyError(f'{path} line {number} has no string "text" field: each line must be an object '
                              'like {"text": "..."}')
        documents.append(Document(f"{path.name}:{number}", record["text"]))
    return documents


def split_documents(documents: list[Document], fraction: float = VALIDATION_FRACTION,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, validation), each in source order. Validation is round(fraction * n) documents (at least
    one, never all): those whose sha256(seed, name) is smallest, so the split depends on no Python or
    torch version, nor on the order the documents are listed in. One document is cut instead:
    its last `fraction` of the text, from a line start, is validation."""
    if len(documents) == 1:
        return _cut(documents[0], fraction)
    count = min(max(round(len(documents) * fraction), 1), len(documents) - 1)
    rank = sorted(range(len(documents)),
                  key=lambda i: hashlib.sha256(f"{seed}\0{documents[i].name}".encode()).digest())
    held = set(rank[:count])
    return ([d for i, d in enumerate(documents) if i not in held],
            [d for i, d in enumerate(documents) if i in held])


def _cut(document: Document, fraction: float) -> tuple[list[Document], list[Document]]:
    text = document.text
    at = int(len(text) * (1 - fraction))
    line = text.find("\n", at)
    cut = line + 1 if 0 <= line < len(text) - 1 else at  # after the next newline, unless it ends the text
    if not 0 < cut < len(text):
        raise MoeifyError(f"{document.name} is too short to split into train and validation ({len(text)} "
                          "characters): give more text")
    return ([Document(document.name, text[:cut])], [Document(document.name, text[cut:])])


def load_corpus(tokens: Tokens, text: Path | None = None, data: Path | None = None,
                validation_fraction: float = VALIDATION_FRACTION, seed: int = 0) -> Corpus:
    """The text read, split by document and tokenised: what training and validation batches are cut from."""
    source = read_source(text, data)
    documents = [d for d in source.documents if d.text]
    if not documents:
        raise MoeifyError(f"{source.name} holds no text: point {opt('text')} at a non-empty UTF-8 file or "
                          f"directory, or {opt('data')} at a JSONL file with text")
    train, validation = split_documents(documents, validation_fraction, seed)
    return Corpus(source.name, source.unit, tokens.name, _split("train", train, tokens),
                  _split("validation", validation, tokens))


def _split(name: str, documents: list[Document], tokens: Tokens) -> Split:
    # EOS after each document marks where one text ends, as GPT-2's <|endoftext|> does between documents.
    eos = [torch.tensor([tokens.eos_id])] if tokens.eos_id is not None else []
    ids = torch.cat([part for d in documents for part in [tokens.encode(d.text).long(), *eos]])
    return Split(name, len(documents), sum(len(d.text.encode("utf-8")) for d in documents), ids)
