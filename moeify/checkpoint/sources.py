"""Dense model sources: a built-in preset (random init) or a local Hugging Face directory."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from moeify.checkpoint.files import indexed_shards, read_json
from moeify.checkpoint.integrity import Verifier
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
        return [directory / name for name in indexed_shards(index)]
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


def config_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config value it cannot use: a wrong type or range, in the config's strict
    field validation (huggingface_hub's own error class) or when a model is built from it."""
    from huggingface_hub.errors import StrictDataclassError

    return ValueError, KeyError, TypeError, AttributeError, IndexError, StrictDataclassError


def config_from_dict(data: dict, where: str):
    """A transformers config from its JSON dict (a config.json, or moeify.json's dense_config)."""
    import transformers

    model_type = data.get("model_type")
    if not model_type:
        raise MoeifyError(f"{where} has no model_type: it is not a transformers config")
    if model_type not in transformers.CONFIG_MAPPING and data.get("auto_map"):
        raise MoeifyError(f"{where}: model_type {model_type!r} is defined by the directory's own Python code "
                          "(auto_map), which moeify never runs: convert a model whose class ships with transformers")
    try:
        config = transformers.AutoConfig.for_model(**data)
    except config_errors() as e:  # a value of the wrong type, e.g. id2label "x"
        raise MoeifyError(f"{where}: transformers cannot read it ({' '.join(str(e).split())})") from None
    _check_layer_counts(config, where)
    return config


# Building a model makes one module per layer, on the meta device too, before any memory estimate can refuse it:
# a damaged count (10**15) would build for ever. Released models stay far below (Llama 3.1 405B: 126 layers).
MAX_LAYERS = 4096
LAYER_COUNTS = ("num_layers", "num_decoder_layers", "num_hidden_layers", "n_layer", "encoder_layers",
                "decoder_layers")


def _check_layer_counts(config, where: str) -> None:
    for name in LAYER_COUNTS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > MAX_LAYERS:
            raise MoeifyError(f"{where}: {name} is {value:,}, more layers than moeify builds (at most {MAX_LAYERS:,}): "
                              f"the file is damaged; correct {name}, or save the model again")


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
    remote = [ref for ref in _auto_map_refs(config) if ref.rpartition(".")[2] in names]
    if remote:  # the class is the directory's own code: a built-in stand-in would compute something else
        raise MoeifyError(f"config architectures {names} name the directory's own Python code ({remote[0]} in "
                          "auto_map), which moeify never runs: convert a model whose class ships with transformers")
    if config.model_type == "t5":
        return transformers.T5ForConditionalGeneration
    raise MoeifyError(f"config architectures {names or '(none)'} are not transformers classes: "
                      "moeify only builds models that ship with transformers (no remote code)")


def _auto_map_refs(config) -> list[str]:
    """The "module.Class" references of a config's auto_map (values may be lists: a tokenizer's slow/fast pair)."""
    auto_map = getattr(config, "auto_map", None)
    refs = []
    for value in (auto_map.values() if isinstance(auto_map, dict) else []):
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    return refs


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


def load_dense(source: str, *, device: str = "cpu", seed: int = 0, verify: bool = True) -> DenseModel:
    """The dense model named by `source` (a path or a preset). `verify`: a directory moeify wrote (a dense
    training checkpoint, a Hugging Face export) is checked against its moeify-manifest.json first."""
    found = resolve_source(source)
    if isinstance(found, Path):
        model = _load_directory(found, device, verify)
        return DenseModel(model, None, {"kind": "hf", "path": str(found.resolve()),
                                        "architecture": type(model).__name__})
    preset = found
    import transformers

    family = preset.family
    config = getattr(transformers, family.config_class)(**preset.config, architectures=[family.architecture])
    model = build_hf(config, device, seed)
    return DenseModel(model, preset, {"kind": "preset", "name": preset.name, "seed": seed,
                                      "architecture": type(model).__name__})


def _load_directory(path: Path, device: str, verify: bool = True) -> nn.Module:
    if not path.is_dir():
        raise MoeifyError(f"{path} is a file: pass a Hugging Face model directory (config.json + safetensors)")
    if (path / MOEIFY_FILE).is_file():
        raise MoeifyError(f"{path} is already a moeify output: inspect it with `moeify inspect {path}`")
    if not (path / "config.json").is_file():
        raise MoeifyError(f"{path} has no config.json: pass a Hugging Face model directory")
    config = hf_config(path)  # first: a config.json transformers cannot read has its own, more precise refusal
    checked = Verifier(path) if verify else None
    if checked is not None:
        checked.check_all(skip=lambda name: name.endswith(".safetensors"))  # the weights as they load
    if config.model_type == "switch_transformers":  # its FFNs are experts already: converting them again is wrong
        raise MoeifyError(f"{path} is a SwitchTransformers checkpoint, sparse already: import it with "
                          f"`moeify convert {path}` (moeify.checkpoint.switch_import.import_switch)")
    files = weight_files(path)
    if device != "meta" and not files:
        raise MoeifyError(f"{path} has no model.safetensors: add the weights, or use --device meta "
                          "for a structure-only conversion")
    model = build_hf(config, "meta" if device == "meta" else "cpu", init=False)  # load_weights fills it
    if device != "meta":
        load_weights(model, files, before=checked.check if checked else None)
        model.to(device)
    return model


def load_weights(model: nn.Module, files: list[Path], *, progress=None, assign: bool = False,
                 device: str | torch.device = "cpu", before: Callable[[Path], None] | None = None) -> dict[str, str]:
    """Copy safetensors weights into `model`, which must expect exactly these names; with `assign`, each tensor
    read becomes the parameter itself (no second copy: `model` may be on meta). `before`(file) runs just before
    each file loads (a Verifier's check: the load then reads the pages it hashed). Returns the tied aliases, found
    before loading, since assignment separates what they name."""
    from safetensors.torch import load_file

    aliases = tied_aliases(model)  # identity still tells ties apart on meta
    expected = set(model.state_dict())
    seen: set[str] = set()
    for i, f in enumerate(files):
        check_safetensors(f)  # first: a truncated or garbled header has its own, more precise refusal
        if before is not None:
            before(f)
        tensors = load_file(str(f), device=str(device))
        unexpected = sorted(set(tensors) - expected)
        if unexpected:
            raise MoeifyError(f"{f} holds weights the model does not have ({unexpected[:3]}): "
                              "it belongs to a different model or configuration")
        shapes = model.state_dict()
        wrong = next((k for k, t in tensors.items() if tuple(t.shape) != tuple(shapes[k].shape)), None)
        if wrong is not None:
            raise MoeifyError(f"{f} holds {wrong} of shape {list(tensors[wrong].shape)} where the model has "
                              f"{list(shapes[wrong].shape)}: it belongs to a different model or configuration")
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
                   device: str | torch.device = "cpu", progress=None,
                   before: Callable[[Path], None] | None = None) -> None:
    """Fill `model`, built on the meta device, from safetensors `files`: each tensor read is assigned, not copied,
    so the weights exist once; then tied weights are restored and `buffers` (values no checkpoint holds, such as
    rotary tables) registered. Every tensor must end up with a value. `before`: as load_weights'."""
    aliases = load_weights(model, files, progress=progress, assign=True, device=device, before=before)
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
