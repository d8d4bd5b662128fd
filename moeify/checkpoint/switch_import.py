"""Import a SwitchTransformers directory as a moeify model: its dense T5 converted without init, weights mapped in."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from moeify.checkpoint.hf_switch import T5_CLASS, moeify_name, switch_moe_config, switch_stacks, t5_config_fields
from moeify.checkpoint.sources import build_hf, check_safetensors, hf_config, tied_aliases, weight_files
from moeify.conversion.pipeline import convert
from moeify.errors import MoeifyError

SHOWN = 3  # names shown in one error line


def check_switch_config(path: Path, switch: Any) -> None:
    """Refuse what moeify's converted T5 cannot hold, before anything is built."""
    from transformers.activations import ACT2FN

    if switch.router_bias:
        raise MoeifyError(f"{path}'s routers have a bias (router_bias: true), moeify's have none: "
                          "moeify cannot import this checkpoint")
    if switch.dense_act_fn not in ACT2FN:
        raise MoeifyError(f"{path}'s dense_act_fn {switch.dense_act_fn!r} is no activation transformers knows "
                          "(SwitchTransformers uses relu): fix config.json")
    if not switch.tie_word_embeddings:
        raise MoeifyError(f"{path} keeps its lm_head apart from its embeddings (tie_word_embeddings: false), "
                          f"and transformers' {T5_CLASS} always ties them: moeify cannot import this checkpoint")


def import_switch(path: str | Path, *, device: str = "cpu", overrides: dict[str, Any] | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> nn.Module:
    """The converted T5 equal to the SwitchTransformers model in `path`, weights from its safetensors.

    No conversion step of moeify's own: the dense T5 of the same geometry is converted, without
    initialisation, at the checkpoint's sparse layers with its experts and router settings, and
    every tensor is copied from the checkpoint. `overrides` (MoEConfig fields) replace its run-time
    options; what its weights fix cannot change. On `device` meta: the structure only.
    """
    from transformers import T5Config

    path = Path(path)
    switch = hf_config(path)
    check_switch_config(path, switch)
    config = switch_moe_config(switch, path, overrides)
    files = weight_files(path)  # refuses pickle-only directories
    if device != "meta" and not files:
        raise MoeifyError(f"{path} has no model.safetensors: add the weights, or use --device meta "
                          "for a structure-only import")
    dense = build_hf(T5Config(**t5_config_fields(switch)), "meta" if device == "meta" else "cpu", init=False)
    source = {"kind": "hf", "path": str(path.resolve()), "architecture": T5_CLASS, "imported": switch.model_type,
              "expert_capacity": switch.expert_capacity}  # per sequence there; moeify uses capacity factors
    sparse = convert(dense, config, inplace=True, source=source, progress=progress, _skip_init=True)
    _check_sites(path, switch, sparse.moeify_record.site_names)
    if device != "meta":
        load_switch_weights(sparse, files, progress=progress)
        sparse.to(device)
    return sparse


def _check_sites(path: Path, switch: Any, sites: list[str]) -> None:
    ffn = {"encoder.block": 1, "decoder.block": 2}  # index of the FFN sublayer in a T5 block
    want = [f"{stack}.{i}.layer.{ffn[stack]}.DenseReluDense"
            for stack, (_, positions) in switch_stacks(switch).items() for i in positions]
    if sites != want:
        raise MoeifyError(f"importing {path} converted {sites[:2]}..., expected {want[:2]}...: "
                          "this is a moeify bug, please report it")


@torch.no_grad()
def load_switch_weights(model: nn.Module, files: list[Path], *,
                        progress: Callable[[str, int, int], None] | None = None) -> None:
    """Copy a SwitchTransformers checkpoint's tensors into the converted T5 `model`, one by one:
    each expert into its row of the stacked weights. Every tensor must find its place and fill it."""
    from safetensors import safe_open

    state = model.state_dict()
    aliases = tied_aliases(model)  # tied copies: the checkpoint's own value is its source's
    filled: set[tuple[str, int | None]] = set()
    for i, file in enumerate(files):
        check_safetensors(file)
        with safe_open(str(file), "pt") as f:
            names = list(f.keys())
            unexpected = [k for k in names if not _has(state, *moeify_name(k))]
            if unexpected:
                raise MoeifyError(f"{file} holds weights a SwitchTransformers model of its config.json does not "
                                  f"have ({', '.join(unexpected[:SHOWN])}): it belongs to another configuration")
            for key in names:
                name, expert = moeify_name(key)
                if name in aliases:
                    continue
                target = state[name] if expert is None else state[name][expert]
                tensor = f.get_tensor(key)
                if tensor.shape != target.shape:
                    raise MoeifyError(f"{file}: {key} is {tuple(tensor.shape)}, its config.json makes it "
                                      f"{tuple(target.shape)}: the weights belong to another configuration")
                target.copy_(tensor)
                filled.add((name, expert))
        if progress:
            progress("load", i + 1, len(files))
    missing = [k for k, t in state.items() if k not in aliases and not _full(filled, k, t)]
    if missing:
        raise MoeifyError(f"the weights in {files[0].parent} lack {len(missing)} tensors "
                          f"({', '.join(missing[:SHOWN])}): the checkpoint is incomplete or for another configuration")


def _has(state: dict[str, torch.Tensor], name: str, expert: int | None) -> bool:
    return name in state and (expert is None or expert < state[name].shape[0])


def _full(filled: set[tuple[str, int | None]], name: str, tensor: torch.Tensor) -> bool:
    if (name, None) in filled:
        return True
    return name.endswith((".experts.w_in", ".experts.w_out")) and all(
        (name, j) in filled for j in range(tensor.shape[0]))
