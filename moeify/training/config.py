"""The options of a training run, torch-free so the CLI builds its flags from them: DataConfig and TrainConfig."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from moeify.config import option_field
from moeify.errors import MoeifyError, opt
from moeify.training.schedule import SCHEDULES, lr_at

VALIDATION_FRACTION = 0.05  # of the documents (files or JSONL lines) held out for validation
MASK_RATE = 0.15  # BERT's masked_lm_prob
NOISE_DENSITY = 0.15  # the fraction of tokens corrupted (T5's default)
MEAN_NOISE_SPAN = 3.0  # their mean span length, in tokens (T5's default)
OPTIMIZERS = ("adamw", "adafactor")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class DataConfig:
    """The data side of a training run; each default lives here."""

    text: Path | None = option_field(None, "a UTF-8 file or a directory of text files [default: the Python standard "
                                           "library's source]")
    data: Path | None = option_field(None, 'a JSONL file with a "text" string per line')
    seq_len: int = option_field(128, "model input tokens per sequence (span corruption: the encoder's)")
    batch_size: int = option_field(8, "sequences per batch")
    seed: int = option_field(0, "seed of the split, the example order and every objective draw")
    validation_fraction: float = option_field(VALIDATION_FRACTION, "fraction of documents (files or lines) held out")
    validation_batches: int = option_field(4, "validation batches, the same ones every evaluation")
    noise_density: float = option_field(NOISE_DENSITY, "span corruption: fraction of tokens corrupted")
    mean_noise_span: float = option_field(MEAN_NOISE_SPAN, "span corruption: mean corrupted span length")
    mask_rate: float = option_field(MASK_RATE, "masked LM: fraction of tokens predicted")

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "validation_batches"):
            if getattr(self, name) < 1:
                _refuse(self, name, "must be at least 1")
        for name in ("validation_fraction", "noise_density", "mask_rate"):
            if not 0 < getattr(self, name) < 1:  # nan fails too
                _refuse(self, name, "must be between 0 and 1")
        if not 1 <= self.mean_noise_span < math.inf:
            _refuse(self, "mean_noise_span", "must be a number of tokens, at least 1")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation side of a training run; each default lives here."""

    steps: int = option_field(1000, "optimizer steps in the whole run (a resumed run counts the steps already done)")
    optimizer: str = option_field("adamw", "adamw (torch.optim.AdamW) or adafactor (torch.optim.Adafactor)")
    lr: float = option_field(1e-3, "peak learning rate")
    warmup: int = option_field(100, "steps of linear warmup to the peak rate")
    schedule: str = option_field("inverse-sqrt", "after warmup: inverse-sqrt (T5, Switch) or cosine (to 0 at --steps)")
    weight_decay: float = option_field(0.0, "decoupled weight decay")
    clip: float = option_field(1.0, "gradient clipping: max global norm; 0 turns it off")
    precision: str = option_field("fp32", "fp32, or bf16 autocast (the routers stay float32)")
    eval_every: int = option_field(100, "steps between validation losses (and best checkpoints); 0: only at the end")
    log_every: int = option_field(10, "steps between metrics.csv rows")
    save_every: int = option_field(500, "steps between checkpoints (one is always saved at the end)")
    keep: int = option_field(2, "step checkpoints kept, the latest ones (best is kept apart)")

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "save_every", "keep"):
            if getattr(self, name) < 1:
                _refuse(self, name, "must be at least 1")
        for name in ("warmup", "eval_every", "weight_decay", "clip"):
            if not 0 <= getattr(self, name) < math.inf:  # nan fails too
                _refuse(self, name, "must be a finite number, at least 0")
        if not 0 < self.lr < math.inf:
            _refuse(self, "lr", "must be a finite number above 0")
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise MoeifyError(f"{opt(name, getattr(self, name))} is not one of {', '.join(allowed)}")

    def lr_at(self, step: int) -> float:
        return lr_at(step, lr=self.lr, warmup=self.warmup, schedule=self.schedule, steps=self.steps)


def _refuse(config, name: str, problem: str) -> NoReturn:
    """One line naming the option, its value, what it must be, and its default as the fix."""
    default = next(f.default for f in dataclasses.fields(config) if f.name == name)
    raise MoeifyError(f"{opt(name, getattr(config, name))} {problem}: leave it unset for {opt(name, default)}, "
                      "the default")
