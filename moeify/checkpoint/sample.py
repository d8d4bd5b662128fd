"""Synthetic token batches for a quick forward check of a converted model."""
from __future__ import annotations

import torch
from torch import nn


def sample_inputs(model: nn.Module, batch: int = 2, seq: int = 32, seed: int = 0) -> dict | None:
    """Keyword inputs a transformers model accepts, or None when the model's inputs are unknown."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        return None
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, max(1, seq // 4)), generator=g)
    return inputs
