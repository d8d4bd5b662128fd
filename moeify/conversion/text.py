"""Calibration text and its token batches: the Python standard library's own source, nothing downloaded."""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator

import torch


def stdlib_text(max_bytes: int = 2_000_000) -> str:
    """Python's own standard library source: real text on every machine, nothing to download."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chunks, size = [], 0
    for f in files:
        text = f.read_text(errors="replace")
        chunks.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "".join(chunks)[:max_bytes]


def token_ids(text: str, vocab_size: int, tokenizer=None) -> torch.Tensor:
    """Token ids of `text`: the model's tokenizer when there is one, else UTF-8 bytes (+3 past
    T5's pad/eos/unk ids), which still gives real-text statistics to the routers."""
    if tokenizer is not None:
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    return (data + 3) % vocab_size


def text_batches(ids: torch.Tensor, batches: int, batch_size: int, seq_len: int,
                 encoder_decoder: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive windows of the text: the encoder reads one, the decoder the next quarter."""
    tgt = max(1, seq_len // 4)
    need = batch_size * (seq_len + tgt)
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
                return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            except (OSError, ValueError):
                continue
    return None
