"""Fixed-shape batches from a token stream: an endless, resumable training stream and a fixed validation set."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from moeify.errors import MoeifyError, opt
from moeify.training.objectives import Objective


def seeded(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator for one purpose and step, seeded by sha256 of (seed, keys): a batch's draws depend on
    nothing but its step, so a checkpoint saves its data position and no generator state."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands (the next batch is `step`), and what it was cut from: saved with a
    checkpoint, it continues the stream exactly."""

    step: int
    seed: int
    train_tokens: int
    example_length: int
    batch_size: int
    objective: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        names = [f.name for f in fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(names):
            raise MoeifyError(f"the checkpoint's data position {data!r} is not one moeify saved: it needs exactly "
                              f"{', '.join(names)}")
        return cls(**data)


def _examples(ids: torch.Tensor, length: int) -> torch.Tensor:
    """The stream cut into consecutive (n, length) examples; the tail shorter than one is left out."""
    n = len(ids) // length
    return ids[:n * length].reshape(n, length)


class TrainBatches:
    """Endless training batches, deterministic given the seed. The split is cut into consecutive examples of
    objective.example_length tokens; epoch e visits them all in an order drawn from (seed, "epoch", e),
    batch_size at a time (an epoch's last incomplete batch is skipped), and the objective's draws for batch
    `step` come from (seed, "train", step)."""

    def __init__(self, ids: torch.Tensor, objective: Objective, batch_size: int, seed: int,
                 position: DataPosition | None = None) -> None:
        self.objective, self.batch_size, self.seed = objective, batch_size, seed
        self.train_tokens = len(ids)
        self._examples = _examples(ids, objective.example_length)
        if len(self._examples) < batch_size:
            raise MoeifyError(f"the train split has {len(ids):,} tokens, fewer than one batch of {batch_size} x "
                              f"{objective.example_length}: give more text, or lower {opt('batch_size')} or "
                              f"{opt('seq_len')}")
        self.batches_per_epoch = len(self._examples) // batch_size
        self.step = 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its example order), the last one used
        if position is not None:
            self._check(position)
            self.step = position.step

    @property
    def position(self) -> DataPosition:
        return DataPosition(self.step, self.seed, self.train_tokens, self.objective.example_length,
                            self.batch_size, self.objective.kind)

    @property
    def epoch(self) -> int:
        return self.step // self.batches_per_epoch

    def _check(self, saved: DataPosition) -> None:
        now = self.position
        changed = [f"{f.name} {getattr(saved, f.name)} (now {getattr(now, f.name)})" for f in fields(DataPosition)
                   if f.name != "step" and getattr(saved, f.name) != getattr(now, f.name)]
        if changed:
            raise MoeifyError(f"the saved data position was drawn with {', '.join(changed)}: resume with the same "
                              f"text, {opt('seq_len')}, {opt('batch_size')} and {opt('seed')}")

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Batch number `step` of the stream (what the iterator returns after `step` others)."""
        epoch, k = divmod(step, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, torch.randperm(len(self._examples), generator=seeded(self.seed, "epoch", epoch)))
        rows = self._order[1][k * self.batch_size:(k + 1) * self.batch_size]
        return self.objective(self._examples[rows], seeded(self.seed, "train", step))

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batch(self.step)
        self.step += 1
        return batch


def validation_batches(ids: torch.Tensor, objective: Objective, batch_size: int, count: int,
                       seed: int) -> list[dict[str, torch.Tensor]]:
    """The same `count` batches every time (fewer when the split is short): the split's first examples in
    order, the objective's draws for batch i from (seed, "validation", i)."""
    examples = _examples(ids, objective.example_length)
    available = len(examples) // batch_size
    if available == 0:
        raise MoeifyError(f"the validation split has {len(ids):,} tokens, fewer than one batch of {batch_size} x "
                          f"{objective.example_length}: give more text, or raise {opt('validation_fraction')}")
    return [objective(examples[i * batch_size:(i + 1) * batch_size], seeded(seed, "validation", i))
            for i in range(min(count, available))]
