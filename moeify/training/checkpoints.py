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
from moeify.errors import MoeifyError

CHECKPOINTS = "checkpoints"
BEST = "best"
TRAINER_JSON, TRAINER_TENSORS = "trainer.json", "trainer.safetensors"
TRAINER_SCHEMA, TRAINER_VERSION = "moeify.trainer", 1
RNG_KEY = "rng/torch"
_STEP = re.compile(r"step-(\d+)")


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
    data = read_json(path / TRAINER_JSON, fix="the checkpoint is damaged: resume from another one")
    if data.get("schema") != TRAINER_SCHEMA or data.get("version") != TRAINER_VERSION:
        raise MoeifyError(f"{path / TRAINER_JSON} is not a moeify trainer file of version {TRAINER_VERSION}")
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
    from safetensors.torch import load_file

    tensors = load_file(str(path / TRAINER_TENSORS))
    torch.set_rng_state(tensors.pop(RNG_KEY))
    optimizer.load_state_dict(join_state(tensors, trainer["optimizer"]))


def trim_metrics(metrics: Path, step: int) -> None:
    """Drop metrics.csv rows after `step`: a resumed run logs those steps again."""
    if not metrics.is_file():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if line.split(",", 1)[0].isdigit()
                        and int(line.split(",", 1)[0]) <= step]
    metrics.write_text("".join(kept))
