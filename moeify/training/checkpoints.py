"""Checkpoints of a run: the model plus trainer.json and trainer.safetensors (optimizer, RNG), saved atomically."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeify.checkpoint.files import atomic_directory, read_json
from moeify.checkpoint.integrity import Verifier
from moeify.checkpoint.metadata import MOEIFY_FILE
from moeify.checkpoint.schemas import (
    ANY_OBJECT,
    NULL,
    Either,
    Int,
    List,
    Map,
    Num,
    Obj,
    Schema,
    Spec,
    Str,
    Tag,
    Version,
    check,
    fields_of,
    nullable,
)
from moeify.errors import MoeifyError
from moeify.training.config import OPTIMIZERS, PRECISIONS, DataConfig, TrainConfig
from moeify.training.schedule import SCHEDULES

CHECKPOINTS = "checkpoints"
BEST = "best"
TRAINER_JSON, TRAINER_TENSORS = "trainer.json", "trainer.safetensors"
TRAINER_SCHEMA, TRAINER_VERSION = "moeify.trainer", 1
RNG_KEY = "rng/torch"
_STEP = re.compile(r"step-(\d+)")
DAMAGED = "the checkpoint is damaged: resume from another one"


class _Loss(Spec):
    """A loss as json.dumps writes a float: a diverged run's NaN or Infinity is a value too."""

    expected = "a number or null"

    def ok(self, value: Any) -> bool:
        return value is None or type(value) in (int, float)


# trainer.json, as save_checkpoint and gather.py write it: the configs are checked here, field by field, so that a
# damaged file is one line naming the key, not a TypeError in TrainConfig(**...) or in the optimizer's load.
TRAINER = Schema(Obj({
    "schema": Tag(TRAINER_SCHEMA, "a moeify trainer file"), "version": Version(TRAINER_VERSION),
    "step": Int(1), "tokens": Int(0), "wall_seconds": Num(0), "best_val_loss": _Loss(),
    "train": fields_of(TrainConfig, steps=Int(1), optimizer=Str(OPTIMIZERS), lr=Num(above=0), warmup=Int(0),
                       schedule=Str(SCHEDULES), weight_decay=Num(0), clip=Num(0), precision=Str(PRECISIONS),
                       eval_every=Int(0), log_every=Int(1), save_every=Int(1), keep=Int(1)),
    "data": fields_of(DataConfig, text=nullable(Str()), data=nullable(Str()), seq_len=Int(1), batch_size=Int(1),
                      seed=Int(), validation_fraction=Num(above=0, max=1), validation_batches=Int(1),
                      noise_density=Num(above=0, max=1), mean_noise_span=Num(1), mask_rate=Num(above=0, max=1)),
    "data_position": Obj({"step": Int(0), "seed": Int(), "train_tokens": Int(0), "example_length": Int(1),
                          "batch_size": Int(1), "objective": Str()}),
    # A --nproc run keeps each rank's optimizer state in its own file, and says so under "distributed".
    "optimizer": Either(Obj({"state": Map(ANY_OBJECT, key=Str(pattern=r"\d+", what="a parameter index")),
                             "param_groups": List(ANY_OBJECT)}), NULL)},
    {"distributed": Obj({"nproc": Int(1), "expert_parallel": Int(1)})}), DAMAGED)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step}"


def split_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as safetensors-ready tensors ("state/<param>/<name>") and the JSON rest: no pickle."""
    tensors, plain = {}, {}
    for index, entry in state["state"].items():
        plain[str(index)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{index}/{name}"] = value.detach().contiguous()
            else:
                plain[str(index)][name] = value
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def join_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    """split_state's inverse."""
    state: dict[int, dict[str, Any]] = {int(i): dict(entry) for i, entry in plain["state"].items()}
    for key, value in tensors.items():
        kind, index, name = key.split("/", 2)
        if kind == "state":
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict) -> Path:
    """Write `model` (moeify.save, or save_pretrained for a dense one), the optimizer state, the torch RNG
    state and `trainer` (step, configs, data position, ...) to directory `path`: all of it or nothing."""
    from safetensors.torch import save_file

    from moeify.checkpoint.store import save

    tensors, plain = split_state(optimizer.state_dict())
    tensors[RNG_KEY] = torch.get_rng_state()  # dropout and router jitter draw from it
    with atomic_directory(path, force=True) as tmp:
        if getattr(model, "moeify_record", None) is not None:
            save(model, tmp, force=True)  # atomic itself: it replaces the empty tmp
        else:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its per-checkpoint shard bar would interleave with ours
            try:
                model.save_pretrained(tmp, safe_serialization=True)
            finally:
                hf_logging.enable_progress_bar()
        save_file(tensors, str(tmp / TRAINER_TENSORS))
        # trainer.json last: a directory that has it is complete
        (tmp / TRAINER_JSON).write_text(json.dumps(
            {"schema": TRAINER_SCHEMA, "version": TRAINER_VERSION, **trainer, "optimizer": plain}, indent=2))
    return path


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete step checkpoint, oldest first."""
    found = []
    for d in (Path(run_dir) / CHECKPOINTS).glob("step-*"):
        m = _STEP.fullmatch(d.name)
        if m and (d / TRAINER_JSON).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def prune(run_dir: Path, keep: int) -> None:
    """Remove all but the latest `keep` step checkpoints."""
    for _, d in step_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path:
    found = step_checkpoints(run_dir)
    if not found:
        raise MoeifyError(f"{run_dir} has no checkpoint to resume from (no {CHECKPOINTS}/step-N with "
                          f"{TRAINER_JSON}): start the run without --resume")
    return found[-1][1]


def read_trainer(path: Path, *, verify: bool = True) -> dict:
    """trainer.json of checkpoint `path`. `verify`: the checkpoint's listing and its trainer files (trainer.json, the
    optimizer and RNG state) are checked against its moeify-manifest.json first; the model's files are checked as
    load_model reads them."""
    if verify:
        checked = Verifier(path)
        checked.check_listing()
        for name in sorted(checked.entries or {}):
            if name.startswith("trainer"):  # trainer.json, trainer.safetensors, trainer-rank-*.safetensors
                checked.check(name)
    file = path / TRAINER_JSON
    data = check(TRAINER, read_json(file, fix=DAMAGED), file)
    if (data["optimizer"] is None) != ("distributed" in data):
        raise MoeifyError(f"{file}: optimizer must be null exactly when the file has a distributed key: {DAMAGED}")
    named = _STEP.fullmatch(Path(path).name)
    if named and int(named.group(1)) != data["step"]:
        raise MoeifyError(f"{file}: step is {data['step']}, but the checkpoint is {Path(path).name}: {DAMAGED}")
    return data


def load_model(path: Path, *, verify: bool = True) -> nn.Module:
    """The checkpoint's model: a moeify directory, or a dense Hugging Face one; `verify` as moeify.load's."""
    if (path / MOEIFY_FILE).is_file():
        from moeify.checkpoint.store import load

        return load(path, verify=verify)
    from moeify.checkpoint.sources import load_dense

    return load_dense(str(path), verify=verify).model


def restore_trainer(path: Path, optimizer: torch.optim.Optimizer, trainer: dict) -> None:
    """Load the optimizer state and the torch RNG state saved with checkpoint `path`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = path / TRAINER_TENSORS
    try:
        tensors = load_file(str(file))
        rng = tensors.pop(RNG_KEY)
    except (SafetensorError, OSError, KeyError) as e:
        raise MoeifyError(f"{file} cannot be read ({' '.join(str(e).split())}): {DAMAGED}") from None
    try:  # torch checks the groups and parameter counts against the model's, with ValueError, KeyError, ...
        state = join_state(tensors, trainer["optimizer"])
        optimizer.load_state_dict(state)
        torch.set_rng_state(rng)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise MoeifyError(f"{path / TRAINER_JSON}: its optimizer state does not fit the model "
                          f"({' '.join(str(e).split())}): {DAMAGED}") from None


def trim_metrics(metrics: Path, step: int) -> None:
    """Drop metrics.csv rows after `step`: a resumed run logs those steps again."""
    if not metrics.is_file():
        return
    try:
        lines = metrics.read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise MoeifyError(f"{metrics} cannot be read ({' '.join(str(e).split())}): restore it, or move it aside "
                          "to resume without the rows logged so far") from None
    kept = lines[:1] + [line for line in lines[1:] if line.split(",", 1)[0].isdigit()
                        and int(line.split(",", 1)[0]) <= step]
    metrics.write_text("".join(kept))
