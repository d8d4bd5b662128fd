"""Rebuild a saved conversion's structure: the dense model from its saved config, the conversion replayed."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moeify.checkpoint.metadata import MOEIFY_FILE, read_metadata, saved_summary
from moeify.checkpoint.sources import build_hf, config_errors, config_from_dict
from moeify.config import MoEConfig
from moeify.conversion.pipeline import convert
from moeify.errors import MoeifyError


def dense_skeleton(path: Path, meta: dict, device: str) -> nn.Module:
    """The dense transformers model a saved conversion started from, built from moeify.json's dense_config."""
    architecture = meta["source"].get("architecture")
    if architecture is None or not isinstance(meta.get("dense_config"), dict):
        raise MoeifyError(f"{path} holds a converted {meta['source'].get('class', 'custom module')}: "
                          "pass a fresh dense instance as model=..., e.g. moeify.load(path, model=YourModel())")
    where = f"{path / MOEIFY_FILE}'s dense_config"
    config = config_from_dict(meta["dense_config"], where)
    try:
        return build_hf(config, device, architecture=architecture, init=False)  # the saved weights replace every value
    except config_errors() as e:  # a config value the model cannot use
        raise MoeifyError(f"{where} does not build a {architecture} ({' '.join(str(e).split())}): convert the model "
                          "again with `moeify convert`") from None


def replay(path: Path, meta: dict, model: nn.Module) -> nn.Module:
    """Convert `model` (dense) the way the saved one was, without initialising the experts."""
    sparse = convert(model, MoEConfig.from_dict(meta["moe_config"]), inplace=True, _skip_init=True)
    names, saved = sparse.moeify_record.site_names, meta["sites"]
    if names != saved:
        raise MoeifyError(f"{path} was converted at {saved[:2]}..., but the rebuilt model converts at "
                          f"{names[:2]}...: load it with the moeify and model code that wrote it")
    sparse.moeify_record.source = meta["source"]
    # What calibration measured at conversion stays with the model, so a re-save keeps it.
    sparse.moeify_record.init_reports = {layer.name: layer.init_report for layer in saved_summary(meta).moe_layers
                                         if layer.init_report is not None}
    return sparse


def skeleton(path: str | Path, model: nn.Module | None = None,
             buffers: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A saved model's converted structure on the meta device (no weight memory).

    Rebuilt as moeify.load does: dense skeleton from its saved config (or `model`, a fresh dense
    instance, for custom modules), conversion replayed without init. Buffers that no checkpoint
    holds (rotary tables) get no value on meta; pass a dict as `buffers` to receive them.
    """
    path = Path(path)
    meta = read_metadata(path)
    if model is None:
        model = dense_skeleton(path, meta, "meta")
        if buffers is not None and _unsaved_buffers(model):
            # Only a real build computes them: pay for one dense model on the CPU, then drop it.
            dense = dense_skeleton(path, meta, "cpu")
            buffers.update({n: b.clone() for n, b in _unsaved_buffers(dense).items()})
    else:
        if buffers is not None:
            buffers.update({n: b.clone() for n, b in _unsaved_buffers(model).items()})
        model = model.to("meta")
    return replay(path, meta, model)


def _unsaved_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    saved = set(model.state_dict())
    return {n: b for n, b in model.named_buffers() if n not in saved}


