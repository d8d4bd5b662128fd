"""BERT's masked LM: 15% of positions predicted, of those 80% [MASK], 10% a random token, 10% unchanged."""
from __future__ import annotations

import torch

from moeify.training.config import MASK_RATE

IGNORE = -100  # transformers' cross-entropy ignore_index: positions with no prediction


def masked_lm(window: torch.Tensor, generator: torch.Generator, mask_id: int, random_ids: tuple[int, int],
              rate: float = MASK_RATE) -> dict[str, torch.Tensor]:
    """`input_ids` and `labels` of a (batch, length) window. Each row predicts exactly
    max(1, round(length * rate)) positions, as BERT's create_masked_lm_predictions picks a fixed count
    (not a Bernoulli draw per token), so every batch has the same number of labels; labels are the
    original tokens there and IGNORE elsewhere. Draws, in order: positions, the 80/10/10 choice, the
    random tokens (drawn for every picked position, so the draw count never depends on the choice)."""
    batch, length = window.shape
    count = max(1, round(length * rate))
    picked = torch.rand(batch, length, generator=generator).argsort(dim=1)[:, :count]
    choice = torch.rand(batch, count, generator=generator)
    random = torch.randint(random_ids[0], random_ids[1], (batch, count), generator=generator, dtype=window.dtype)
    original = window.gather(1, picked)
    replaced = torch.where(choice < 0.8, torch.full_like(original, mask_id),
                           torch.where(choice < 0.9, random, original))
    labels = torch.full_like(window, IGNORE).scatter(1, picked, original)
    return {"input_ids": window.scatter(1, picked, replaced), "labels": labels}
