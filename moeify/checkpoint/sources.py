"""Dense model sources: a built-in preset (random init) or a local Hugging Face directory."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from moeify.checkpoint.files import read_json
from moeify.checkpoint.metadata import MOEIFY_FILE
from moeify.checkpoint.model_presets import Preset, resolve_source
from moeify.errors import MoeifyError


def check_safetensors(path: Path) -> None:
    """Refuse a missing, corrupt or truncated safetensors file with a one-line fix."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MoeifyError(f"weights file {path} is missing: re-save the model or restore the file")
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise MoeifyError(f"{path} is corrupt or truncated ({e}): re-download or re-save it") from None


def weight_files(directory: Path, stem: str = "model") -> list[Path]:
    """The safetensors files of a directory, single-file or sharded with an index: `stem`.safetensors
    or `stem`.safetensors.index.json (Hugging Face's "model"; moeify outputs use WEIGHTS_STEM)."""
    index = directory / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = read_json(index, fix="re-save the model")["weight_map"]
        except (KeyError, TypeError, AttributeError):
            raise MoeifyError(f"{index} has no weight_map: re-save the model") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise MoeifyError(f"{directory} only has pickle weights (.bin/.pt), which moeify never loads: "
                          "save the model with safetensors (save_pretrained(..., safe_serialization=True))")
    return []


def hf_config(directory: Path):
    """A transformers config read from directory/config.json, never from the network."""
    data = read_json(directory / "config.json", fix=f"is {directory} a complete model directory?")
    return config_from_dict(data, str(directory / "config.json"))


def config_from_dict(data: dict, where: str):
    """A transformers config from its JSON dict (a config.json, or moeify.json's dense_config)."""
    import transformers

    model_type = data.get("model_type")
    if not model_type:
        raise MoeifyError(f"{where} has no model_type: it is not a transformers config")
    try:
        return transformers.AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as e:
        raise MoeifyError(f"{where}: transformers cannot read it ({e})") from None


def hf_model_class(config, architecture: str | None = None) -> type[nn.Module]:
    """The built-in transformers class named `architecture` or by config.architectures.

    Only classes that ship with transformers: remote code is never run.
    """
    import transformers

    names = [architecture] if architecture else list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    if config.model_type == "t5":
        return transformers.T5ForConditionalGeneration
    raise MoeifyError(f"config architectures {names or '(none)'} are not transformers classes: "
                      "moeify only builds models that ship with transformers (no remote code)")


def build_hf(config, device: str, seed: int = 0, architecture: str | None = None, *, init: bool = True) -> nn.Module:
    """A randomly initialised model of `config`; on meta, structure only. Without `init` the weights are
    left as allocated, for a model whose every weight is loaded next (random init of t5-small alone
    takes seconds); buffers computed in __init__ (rotary tables) are still computed."""
    from transformers.initialization import no_init_weights

    cls = hf_model_class(config, architecture)
    torch.manual_seed(seed)
    with torch.device(device), (contextlib.nullcontext() if init else no_init_weights()):
        model = cls(config)
    if not init:
        model.tie_weights()  # init_weights, which no_init_weights skips, is also what ties them
    return model


class DenseModel(NamedTuple):
    """A dense model as loaded: the module, its preset if any, and how to rebuild it (moeify.json's source)."""

    model: nn.Module
    preset: Preset | None
    source: dict[str, Any]


def load_dense(source: str, *, device: str = "cpu", seed: int = 0) -> DenseModel:
    """The dense model named by `source` (a path or a preset)."""
    found = resolve_source(source)
    if isinstance(found, Path):
        model = _load_directory(found, device)
        return DenseModel(model, None, {"kind": "hf", "path": str(found.resolve()),
                                        "architecture": type(model).__name__})
    preset = found
    import transformers

    family = preset.family
    config = getattr(transformers, family.config_class)(**preset.config, architectures=[family.architecture])
    model = build_hf(config, device, seed)
    return DenseModel(model, preset, {"kind": "preset", "name": preset.name, "seed": seed,
                                      "architecture": type(model).__name__})


def _load_directory(path: Path, device: str) -> nn.Module:
    if not path.is_dir():
        raise MoeifyError(f"{path} is a file: pass a Hugging Face model directory (config.json + safetensors)")
    if (path / MOEIFY_FILE).is_file():
        raise MoeifyError(f"{path} is already a moeify output: inspect it with `moeify inspect {path}`")
    if not (path / "config.json").is_file():
        raise MoeifyError(f"{path} has no config.json: pass a Hugging Face model directory")
    config = hf_config(path)
    if config.model_type == "switch_transformers":  # its FFNs are experts already: converting them again is wrong
        raise MoeifyError(f"{path} is a SwitchTransformers checkpoint, sparse already: import it with "
                          f"`moeify convert {path}` (moeify.checkpoint.switch_import.import_switch)")
    files = weight_files(path)
    if device != "meta" and not files:
        raise MoeifyError(f"{path} has no model.safetensors: add the weights, or use --device meta "
                          "for a structure-only conversion")
    model = build_hf(config, "meta" if device == "meta" else "cpu", init=False)  # load_weights fills it
    if device != "meta":
        load_weights(model, files)
        model.to(device)
    return model


def load_weights(model: nn.Module, files: list[Path], *, progress=None, assign: bool = False,
                 device: str | torch.device = "cpu") -> dict[str, str]:
    """Copy safetensors weights into `model`, which must expect exactly these names; with `assign`, each tensor
    read becomes the parameter itself (no second copy: `model` may be on meta). Returns the tied aliases, found
    before loading, since assignment separates what they name."""
    from safetensors.torch import load_file

    aliases = tied_aliases(model)  # identity still tells ties apart on meta
    expected = set(model.state_dict())
    seen: set[str] = set()
    for i, f in enumerate(files):
        check_safetensors(f)
        tensors = load_file(str(f), device=str(device))
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise MoeifyError(f"{f} holds weights the model does not have ({unexpected[:3]}): "
                              "it belongs to a different model or configuration")
        model.load_state_dict(tensors, strict=False, assign=assign)
        seen |= set(tensors)
        del tensors
        if progress:
            progress("load", i + 1, len(files))
    missing = expected - seen - set(aliases)
    if missing:
        raise MoeifyError(f"the weights lack {len(missing)} tensors ({sorted(missing)[:3]}): "
                          "the checkpoint is incomplete or for another configuration")
    return aliases


def assign_weights(model: nn.Module, files: list[Path], *, buffers: dict[str, torch.Tensor] | None = None,
                   device: str | torch.device = "cpu", progress=None) -> None:
    """Fill `model`, built on the meta device, from safetensors `files`: each tensor read is assigned, not copied,
    so the weights exist once; then tied weights are restored and `buffers` (values no checkpoint holds, such as
    rotary tables) registered. Every tensor must end up with a value."""
    aliases = load_weights(model, files, progress=progress, assign=True, device=device)
    values = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    for alias, target in aliases.items():
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, values[target])
    for name, value in (buffers or {}).items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, value.to(device), persistent=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise MoeifyError(f"the weights leave {left[:2]} without values: the checkpoint is incomplete or for "
                          "another configuration")


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{name: earlier name} for tensors reachable under two names (tied weights), stored once."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases
