"""Single-process target: save a converted model as safetensors + configs, and load it back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..atomic import atomic_directory
from ..config import MoEConfig
from ..errors import MoeifyError
from ..pipeline import ConversionRecord, convert
from ..sources import MOEIFY_FILE, build_hf, hf_config, load_weights, read_json, tied_aliases, weight_files
from ..summary import summarize

FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 2 << 30  # like transformers: shards that are easy to move and mmap

Progress = Callable[[str, int, int], None]


def save(model: nn.Module, path: str | Path, *, force: bool = False,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None) -> Path:
    """Write `model` (from moeify.convert) to a directory; atomically, never half-written."""
    from safetensors.torch import save_file

    record = _record_of(model)
    out = Path(path)
    state = model.state_dict()
    aliases = tied_aliases(model)  # tied weights are stored once
    tensors = {k: v for k, v in state.items() if k not in aliases}
    structure_only = any(t.is_meta for t in tensors.values())
    shards = [] if structure_only else _shard(tensors, max_shard_bytes)
    with atomic_directory(out, force=force) as tmp:
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            (tmp / "config.json").write_text(config.to_json_string())
        files = []
        for i, names in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k].contiguous() for k in names}, str(tmp / fname), metadata={"format": "pt"})
            files.append((fname, names))
            if progress:
                progress("save", i + 1, len(shards))
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                     "weight_map": {k: f for f, names in files for k in names}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        meta = {
            "format": "moeify", "format_version": FORMAT_VERSION, "weights": not structure_only,
            "source": record.source, "moe_config": record.config.to_dict(),
            "sites": [vars(s) for s in record.sites], "skipped": record.skipped, "aliases": aliases,
            "summary": summarize(model).to_dict(),
        }
        (tmp / MOEIFY_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_manifest(path: str | Path) -> dict:
    """moeify.json of an output directory, validated."""
    path = Path(path)
    if not path.exists():
        raise MoeifyError(f"{path} does not exist: convert a model first with `moeify convert ... -o {path}`")
    if not (path / MOEIFY_FILE).is_file():
        raise MoeifyError(f"{path} is not a moeify output (no {MOEIFY_FILE}): convert it with `moeify convert`")
    meta = read_json(path / MOEIFY_FILE)
    if not isinstance(meta, dict) or meta.get("format") != "moeify":
        raise MoeifyError(f"{path / MOEIFY_FILE} is not a moeify manifest: re-run `moeify convert`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MoeifyError(f"{path} has format version {meta.get('format_version')}, this moeify reads "
                          f"{FORMAT_VERSION}: convert the model again with this version")
    return meta


def dense_skeleton(path: Path, meta: dict, device: str) -> nn.Module:
    """The dense transformers model a saved conversion started from, built from its config.json."""
    architecture = meta["source"].get("architecture")
    if architecture is None:
        raise MoeifyError(f"{path} holds a converted {meta['source'].get('class', 'custom module')}: "
                          "pass a fresh dense instance as model=..., e.g. moeify.load(path, model=YourModel())")
    return build_hf(hf_config(path), device, architecture=architecture)


def replay(path: Path, meta: dict, model: nn.Module) -> nn.Module:
    """Convert `model` (dense) the way the saved one was, without initialising the experts."""
    sparse = convert(model, MoEConfig.from_dict(meta["moe_config"]), inplace=True, _skip_init=True)
    names = [s.name for s in sparse.moeify_record.sites]
    saved = [s["name"] for s in meta["sites"]]
    if names != saved:
        raise MoeifyError(f"{path} was converted at {saved[:2]}..., but the rebuilt model converts at "
                          f"{names[:2]}...: load it with the moeify and model code that wrote it")
    sparse.moeify_record.source = meta["source"]
    return sparse


def load(path: str | Path, *, model: nn.Module | None = None, device: str | None = None,
         progress: Progress | None = None) -> nn.Module:
    """Rebuild a saved model: dense structure from its config, conversion replayed, weights loaded.

    `model` supplies the dense structure for models that are not transformers classes (pass a
    fresh instance of the class you converted). Structure-only outputs load on the meta device.
    """
    path = Path(path)
    meta = read_manifest(path)
    has_weights = bool(meta["weights"])
    device = device or ("cpu" if has_weights else "meta")
    sparse = replay(path, meta, model if model is not None else
                    dense_skeleton(path, meta, "cpu" if has_weights else "meta"))
    if has_weights:
        load_weights(sparse, weight_files(path), progress=progress)
    return sparse.to(device) if device not in ("cpu", "meta") else sparse


def _record_of(model: nn.Module) -> ConversionRecord:
    record = getattr(model, "moeify_record", None)
    if not isinstance(record, ConversionRecord):
        raise MoeifyError("this model was not produced by moeify.convert: convert it before saving")
    if not record.source:
        import transformers

        cls = type(model)
        if getattr(transformers, cls.__name__, None) is cls:  # rebuildable from config.json
            record.source = {"kind": "transformers", "architecture": cls.__name__}
        else:
            record.source = {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}"}
    return record


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.nbytes
    return shards if shards[0] else []

