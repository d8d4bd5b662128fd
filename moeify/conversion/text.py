"""Text and its token ids, for calibration and training: by default the standard library's own source."""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator

import torch

from moeify.errors import MoeifyError, opt

# Without a tokenizer a UTF-8 byte b is token b + BYTE_OFFSET: ids 0, 1, 2 stay T5's pad, eos and unk.
PAD_ID, EOS_ID, BYTE_OFFSET = 0, 1, 3
BYTE_VOCAB = BYTE_OFFSET + 256  # the smallest vocabulary that holds every byte token


def stdlib_files() -> list[Path]:
    """The standard library's top-level `.py` files, sorted: the same text on every machine with this Python."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def read_text(path: Path) -> str:
    """A file's text; bytes that are not UTF-8 become U+FFFD instead of refusing a mostly-text file."""
    return Path(path).read_text(encoding="utf-8", errors="replace")


def text_option(path: Path | None) -> str:
    """The text of option --text `path` (refused when empty), or the standard library's source when None."""
    if path is None:
        return stdlib_text()
    try:
        text = read_text(path)
    except OSError as e:
        raise MoeifyError(f"{opt('text', str(path))} cannot be read ({e.strerror}): give a UTF-8 text file, or leave "
                          "it unset for the Python standard library's source") from None
    if not text.strip():
        raise MoeifyError(f"{opt('text', str(path))} is empty: give a UTF-8 text file with text, or leave it unset "
                          "for the Python standard library's source")
    return text


def stdlib_text(max_bytes: int = 2_000_000) -> str:
    """Python's own standard library source: real text on every machine, nothing to download."""
    chunks, size = [], 0
    for f in stdlib_files():
        text = read_text(f)
        chunks.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "".join(chunks)[:max_bytes]


def token_ids(text: str, vocab_size: int, tokenizer=None) -> torch.Tensor:
    """Token ids of `text`: the model's tokenizer when there is one, else UTF-8 bytes (+BYTE_OFFSET past
    T5's pad/eos/unk ids), which still gives real-text statistics to the routers."""
    if not text.strip():  # calibration's text; training drops empty documents before this
        raise MoeifyError(f"the calibration text is empty: give {opt('text')} a file with text, or leave it unset "
                          "for the Python standard library's source")
    if tokenizer is not None:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return (data + BYTE_OFFSET) % vocab_size


def window_tokens(batch_size: int, seq_len: int) -> int:
    """Tokens one text_batches batch reads: each row's encoder window and the decoder's quarter after it."""
    return batch_size * (seq_len + max(1, seq_len // 4))


def text_batches(ids: torch.Tensor, batches: int, batch_size: int, seq_len: int,
                 encoder_decoder: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive windows of the text: the encoder reads one, the decoder the next quarter."""
    tgt = max(1, seq_len // 4)
    need = window_tokens(batch_size, seq_len)
    for b in range(batches):
        start = (b * need) % max(1, len(ids) - need)
        window = ids[start:start + need].reshape(batch_size, seq_len + tgt)
        batch = {"input_ids": window[:, :seq_len].contiguous()}
        if encoder_decoder:
            batch["decoder_input_ids"] = window[:, seq_len:].contiguous()
        yield batch


def local_tokenizer(directories: list[Path]):
    """The first local tokenizer found in `directories` (never downloaded), or None."""
    from transformers import AutoTokenizer

    for d in directories:
        if any((d / f).is_file() for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
            try:
                # Never a directory's own tokenizer code: without an explicit False, transformers asks on stdin.
                return AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
            except (OSError, ValueError):
                continue
    return None
