"""Learning-rate schedules: the rate as a pure function of the step, so a checkpoint needs no scheduler state."""
from __future__ import annotations

import math

SCHEDULES = ("inverse-sqrt", "cosine")


def lr_at(step: int, *, lr: float, warmup: int, schedule: str, steps: int) -> float:
    """The rate of update `step` (1-based): a linear warmup over `warmup` steps, then inverse-sqrt decay (the
    T5 / Switch recipe: lr * sqrt(warmup / step)) or a cosine from lr down to 0 at `steps`."""
    if step <= warmup:
        return lr * step / warmup
    if schedule == "inverse-sqrt":
        return lr * math.sqrt(max(warmup, 1) / step)
    if schedule == "cosine":
        progress = (step - warmup) / max(steps - warmup, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}: one of {', '.join(SCHEDULES)}")
