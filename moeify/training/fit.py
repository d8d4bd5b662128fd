"""A run from its current step to --steps: train steps, evaluations, metrics rows and checkpoints; Ctrl-C stops it."""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moeify.layers.switch import switch_layers
from moeify.training.checkpoints import BEST, CHECKPOINTS, prune, save_checkpoint, step_dir
from moeify.training.data import DataConfig, TrainingData
from moeify.training.loop import StepResult, Trainer
from moeify.training.runs import MetricsRow, MetricsWriter


@dataclass
class RunState:
    """What the run has counted so far, saved with each checkpoint (the step is the trainer's)."""

    tokens: int = 0
    wall_seconds: float = 0.0
    best_val_loss: float | None = None


class StopRequest:
    """A SIGINT handler: the first Ctrl-C asks the run to checkpoint and stop after the current step; a second
    one raises KeyboardInterrupt at once (atomic saves leave the last complete checkpoint intact)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def install(self):
        return signal.signal(signal.SIGINT, self)


def trainer_record(trainer: Trainer, state: RunState, data: TrainingData, data_config: DataConfig) -> dict:
    """trainer.json's fields: enough to rebuild the trainer and continue the data stream."""
    data_fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(data_config).items()}
    return {"step": trainer.step, **dataclasses.asdict(state), "train": dataclasses.asdict(trainer.config),
            "data": data_fields, "data_position": data.train.position.to_dict()}


def fit(trainer: Trainer, data: TrainingData, data_config: DataConfig, run_dir: Path, state: RunState,
        on_step: Callable[[StepResult, float], None] = lambda result, tokens_per_s: None,
        stop: StopRequest | None = None, save: Callable[[Path, Trainer, dict], Path] | None = None,
        lead: bool = True) -> Path | None:
    """Train until trainer.config.steps. Returns None when done, or the checkpoint saved on a stop request.

    `save(path, trainer, record)` writes a checkpoint (default: save_checkpoint); `lead` False (the
    ranks but 0 of a distributed run) writes no metrics rows and prunes nothing.
    """
    config = trainer.config
    layers = list(switch_layers(trainer.model))
    start, wall0 = time.perf_counter(), state.wall_seconds

    def checkpoint(path: Path) -> Path:
        state.wall_seconds = wall0 + time.perf_counter() - start
        record = trainer_record(trainer, state, data, data_config)
        if save is not None:
            return save(path, trainer, record)
        return save_checkpoint(path, trainer.model, trainer.optimizer, record)

    with MetricsWriter(run_dir, layers) if lead else contextlib.nullcontext() as metrics:
        while trainer.step < config.steps:
            t0 = time.perf_counter()
            batch = next(data.train)
            result = trainer.train_step(batch)
            n = trainer.tokens(batch)
            state.tokens += n
            step, last = trainer.step, trainer.step == config.steps
            val = None
            if (config.eval_every and step % config.eval_every == 0) or last:
                val = trainer.evaluate(data.validation)
                if state.best_val_loss is None or val < state.best_val_loss:
                    state.best_val_loss = val
                    checkpoint(run_dir / CHECKPOINTS / BEST)
            if lead and (step % config.log_every == 0 or last or val is not None):
                loads = result.load_cv
                metrics.append(MetricsRow(
                    step, state.tokens, wall0 + time.perf_counter() - start, config.lr_at(step), result.ce_loss,
                    val, result.aux_loss, result.z_loss, result.dropped_fraction,
                    sum(loads.values()) / len(loads) if loads else None, loads))
            on_step(result, n / max(time.perf_counter() - t0, 1e-9))
            stopping = stop is not None and stop.requested
            if step % config.save_every == 0 or last or stopping:
                saved = checkpoint(step_dir(run_dir, step))
                if lead:
                    prune(run_dir, config.keep)
                if stopping:
                    return saved
    return None

