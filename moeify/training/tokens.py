"""A model's token ids for training: its tokenizer or UTF-8 bytes, and the special ids the objectives write."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeify.conversion.text import BYTE_OFFSET, BYTE_VOCAB, EOS_ID, token_ids
from moeify.errors import MoeifyError

T5_SENTINELS = 100  # T5 reserves <extra_id_0> ... <extra_id_99> at the top of its vocabulary


@dataclass(frozen=True)
class Tokens:
    """How text becomes ids for one model, and which ids the objectives write."""

    name: str  # the tokenizer's class, or "utf-8 bytes"
    vocab_size: int  # the model's embedding rows: every id stays below it
    eos_id: int | None  # ends span corruption's inputs and targets; separates documents in a split
    mask_id: int | None  # masked LM's [MASK]
    sentinel_ids: tuple[int, ...]  # span corruption's <extra_id_0>, <extra_id_1>, ...: the first span's first
    random_ids: tuple[int, int]  # [low, high): where masked LM's random replacements are drawn
    tokenizer: Any = None  # a transformers tokenizer, or None for bytes

    def encode(self, text: str) -> torch.Tensor:
        return token_ids(text, self.vocab_size, self.tokenizer)


def model_tokens(vocab_size: int, tokenizer: Any = None) -> Tokens:
    """The token scheme of a model with `vocab_size` embedding rows: `tokenizer`'s (local files only,
    see conversion.text.local_tokenizer), or UTF-8 bytes with calibration's offset when it is None."""
    if tokenizer is None:
        return byte_tokens(vocab_size)
    size = len(tokenizer)
    if size > vocab_size:
        raise MoeifyError(f"the tokenizer has {size} ids but the model only {vocab_size} embeddings: "
                          "keep the tokenizer that was saved with this model in its directory")
    sentinels = []
    while True:  # T5's tokenizers know <extra_id_0> ... <extra_id_99>; an unknown token maps to unk (or None)
        i = tokenizer.convert_tokens_to_ids(f"<extra_id_{len(sentinels)}>")
        if i is None or i == tokenizer.unk_token_id:
            break
        sentinels.append(i)
    if not sentinels:  # as T5 does for any vocabulary: the highest ids, descending
        sentinels = list(range(vocab_size - 1, max(vocab_size - 1 - T5_SENTINELS, -1), -1))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    # Random replacements from the whole tokenizer, as transformers' DataCollatorForLanguageModeling.
    return Tokens(type(tokenizer).__name__, vocab_size, eos, tokenizer.mask_token_id, tuple(sentinels),
                  (0, size), tokenizer)


def byte_tokens(vocab_size: int) -> Tokens:
    """UTF-8 byte b is id b + 3 (0, 1, 2: T5's pad, eos, unk); the ids above the bytes never occur in
    text, so they hold the sentinels, the highest first as in T5, and masked LM's [MASK] is the top id
    (an encoder-only model has no sentinels to share it with)."""
    if vocab_size < BYTE_VOCAB + 1:
        raise MoeifyError(f"the model has {vocab_size} token ids, but byte tokens need {BYTE_VOCAB} "
                          f"(3 specials + 256 bytes) and one more above them: use a model with a larger "
                          f"vocabulary (t5-tiny has 384), or put its tokenizer in the model directory")
    top = tuple(range(vocab_size - 1, BYTE_VOCAB - 1, -1))
    return Tokens("utf-8 bytes", vocab_size, EOS_ID, top[0], top, (BYTE_OFFSET, BYTE_VOCAB))
