"""Single-process target: save a converted model as safetensors + configs, and load it back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from moeify.checkpoint.files import atomic_directory, copy_tokenizer
from moeify.checkpoint.integrity import Verifier, remember
from moeify.checkpoint.metadata import FORMAT_VERSION, MOEIFY_FILE, WEIGHTS_STEM, read_metadata
from moeify.checkpoint.skeleton import dense_skeleton, replay, skeleton
from moeify.checkpoint.sources import assign_weights, tied_aliases, weight_files
from moeify.checkpoint.summary import summarize
from moeify.conversion.pipeline import ConversionRecord
from moeify.errors import MoeifyError

DEFAULT_SHARD_BYTES = 2 << 30  # like transformers: shards that are easy to move and mmap

Progress = Callable[[str, int, int], None]


def save(model: nn.Module, path: str | Path, *, force: bool = False,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None,
         tokenizer_from: str | Path | None = None) -> Path:
    """Write `model` (from moeify.convert) to a directory; atomically, never half-written.

    Tokenizer files are copied from `tokenizer_from`, or else from the local Hugging Face
    directory the model was converted from, so that exports can carry them on.
    """
    described = conversion_metadata(model)
    out = Path(path)
    state = model.state_dict()
    aliases = tied_aliases(model)  # tied weights are stored once
    tensors = {k: v for k, v in state.items() if k not in aliases}
    structure_only = any(t.is_meta for t in tensors.values())
    with atomic_directory(out, force=force) as tmp:
        if not structure_only:
            write_weights(tmp, tensors, lambda name: tensors[name].contiguous(), max_shard_bytes, progress)
        meta = {"format": "moeify", "format_version": FORMAT_VERSION, "weights": not structure_only,
                **described, "aliases": aliases}
        (tmp / MOEIFY_FILE).write_text(json.dumps(meta, indent=2))
        copy_tokenizer(_tokenizer_dir(described["source"], tokenizer_from), tmp)
    return out


def conversion_metadata(model: nn.Module) -> dict:
    """What moeify.json says of a converted model: source, dense_config, moe_config, sites, skipped
    and summary. save() writes it; the hf-* families check a live model against the same dict."""
    record = _record_of(model)
    config = getattr(model, "config", None)
    # No config.json (and weights under WEIGHTS_STEM): transformers would otherwise load the directory
    # as the dense model, every converted FFN silently initialised at random. The dense config lives
    # in moeify.json; the hf-* export targets write checkpoints that transformers does load.
    dense_config = (json.loads(config.to_json_string(use_diff=False))
                    if config is not None and hasattr(config, "to_json_string") else None)
    return {"source": record.source, "dense_config": dense_config, "moe_config": record.config.to_dict(),
            "sites": record.site_names, "skipped": record.skipped, "summary": summarize(model).to_dict()}


def load(path: str | Path, *, model: nn.Module | None = None, device: str | None = None,
         progress: Progress | None = None, verify: bool = True) -> nn.Module:
    """Rebuild a saved model: dense structure from its saved config, conversion replayed, weights loaded.

    `model` supplies the dense structure for models that are not transformers classes (pass a
    fresh instance of the class you converted). Structure-only outputs load on the meta device.
    `verify` refuses any file that differs from the directory's moeify-manifest.json (a directory
    without one, from an older moeify, loads unverified); verify=False skips the hashing, for very
    large trusted models: a changed or corrupted file then goes unnoticed.
    """
    path = Path(path)
    meta = read_metadata(path)  # first: a moeify.json that is no longer valid has its own, more precise refusal
    checked = Verifier(path) if verify else None
    if checked is not None:
        # moeify.json and the rest now; each weight file just before it loads, so that the load reads the pages
        # the hash brought in (one pass over the disk). Other safetensors (a checkpoint's trainer state) are not
        # read by a load.
        checked.check_all(skip=lambda name: name.endswith(".safetensors"))
    if not meta["weights"]:
        sparse = replay(path, meta, model if model is not None else dense_skeleton(path, meta, "meta"))
        # The skeleton is built in float32; a bfloat16 or float16 save keeps its own dtype (the routers stay
        # float32: Router keeps its dtype through casts).
        dtype = getattr(torch, str(meta["summary"].get("dtype", "float32")), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype != torch.float32:
            sparse = sparse.to(dtype)
        return sparse  # structure only: it stays on meta
    # Built on meta and filled by assignment: the weights exist once, in the dtypes they were saved in.
    buffers: dict[str, torch.Tensor] = {}
    sparse = skeleton(path, model, buffers)
    assign_weights(sparse, weight_files(path, WEIGHTS_STEM), buffers=buffers, progress=progress,
                   before=checked.check if checked else None)
    return sparse.to(device) if device not in (None, "cpu") else sparse


def _tokenizer_dir(source: dict, given: str | Path | None) -> Path | None:
    if given is not None:
        return Path(given)
    path = source.get("path") if source.get("kind") == "hf" else None
    return Path(path) if path else None


def _record_of(model: nn.Module) -> ConversionRecord:
    record = getattr(model, "moeify_record", None)
    if not isinstance(record, ConversionRecord):
        raise MoeifyError("this model was not produced by moeify.convert: convert it first")
    if not record.source:
        import transformers

        cls = type(model)
        if getattr(transformers, cls.__name__, None) is cls:  # rebuildable from its config
            record.source = {"kind": "transformers", "architecture": cls.__name__}
        else:
            record.source = {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}"}
    return record


def write_weights(directory: Path, like: dict[str, torch.Tensor], values: Callable[[str], torch.Tensor],
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None) -> None:
    """moeify's weight files in `directory`: the tensors named by `like` (their shapes and sizes; meta will do) cut
    into files of at most `max_shard_bytes`, each file's tensors from values(name) and written before the next
    file's are asked for; an index when there are several files."""
    from safetensors.torch import save_file

    shards = _shard(like, max_shard_bytes)
    files = []
    for i, names in enumerate(shards):
        fname = (f"{WEIGHTS_STEM}.safetensors" if len(shards) == 1
                 else f"{WEIGHTS_STEM}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file({name: values(name) for name in names}, str(directory / fname), metadata={"format": "pt"})
        # Hashed now, for the manifest, while the file's pages are still cached: a model larger than memory is
        # then read from the disk only once. safetensors writes from Rust, so the bytes cannot be hashed on
        # their way out; reading them back from the cache costs a pass over memory.
        remember(directory / fname)
        files.append((fname, names))
        if progress:
            progress("save", i + 1, len(shards))
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in like.values())},
                 "weight_map": {k: f for f, names in files for k in names}}
        (directory / f"{WEIGHTS_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2))


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

