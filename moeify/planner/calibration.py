"""Calibration: run a converted model on real text and record how many tokens each expert gets."""
from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from moeify.layers.collector import router_losses

LOAD_SCHEMA = "moeify.load"


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


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterator[dict], *, total: int | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Per Switch layer: tokens routed to each expert (before capacity) and the dropped fraction."""
    model.eval()
    counts: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    with router_losses(model) as losses:
        for i, batch in enumerate(batches):
            losses.clear()
            model(**batch)
            for r in losses.layers:
                counts[r.name] = counts.get(r.name, 0) + r.tokens_per_expert
                dropped[r.name] = dropped.get(r.name, 0) + r.dropped
            if progress:
                progress("calibrate", i + 1, total or i + 1)
    layers = {}
    for name, c in counts.items():
        n = int(c.sum())
        layers[name] = {"tokens": c.tolist(), "fraction": (c.double() / max(n, 1)).tolist(),
                        "dropped_fraction": dropped[name] / max(n, 1)}
    return {"schema": LOAD_SCHEMA, "version": 1, "model": type(model).__name__, "layers": layers}
