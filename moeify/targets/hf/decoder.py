"""Shared by the decoder-only MoE families (Mixtral, Qwen3-MoE): source checks, config carry-over, fused experts."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn

from moeify.checkpoint.sources import config_from_dict
from moeify.config import MoEConfig
from moeify.errors import MoeifyError
from moeify.layers.switch import switch_layers

# Which target exports a converted model of each dense architecture: the one list both families read.
TARGET_OF = {"LlamaForCausalLM": "hf-mixtral", "MistralForCausalLM": "hf-mixtral", "Qwen3ForCausalLM": "hf-qwen3-moe",
             "T5ForConditionalGeneration": "hf-switch"}
SITE = re.compile(r"model\.layers\.(\d+)\.mlp")  # a decoder layer's FFN in all three dense families
BUG = "this is a moeify bug, please report it"


def require_source(meta: dict, target: str) -> str:
    """The dense architecture `meta` was converted from, refused unless `target` exports it."""
    source = meta.get("source") or {}
    arch = source.get("architecture") or source.get("class") or "a custom module"
    if TARGET_OF.get(arch) != target:
        mine = " or ".join(a for a, t in TARGET_OF.items() if t == target)
        fix = (f"export it with the {TARGET_OF[arch]} target" if arch in TARGET_OF
               else "`moeify export --help` lists the targets that accept it")
        raise MoeifyError(f"{target} exports converted {mine} models, not {arch}: {fix}")
    return arch


def dense_config(meta: dict) -> Any:
    """The dense model's transformers config, as moeify.json holds it."""
    data = meta.get("dense_config")
    if not isinstance(data, dict):
        raise MoeifyError("moeify.json holds no dense_config: convert the model again with this moeify")
    return config_from_dict(data, "moeify.json's dense_config")


def converted_layers(meta: dict) -> list[int]:
    """Indices of the decoder layers whose FFN became a Switch layer, in order."""
    found = [SITE.fullmatch(name) for name in meta["sites"]]
    bad = [name for name, m in zip(meta["sites"], found) if m is None]
    if bad:
        raise MoeifyError(f"a Switch layer at {bad[0]}, not at model.layers.N.mlp: {BUG}")
    return sorted(int(m.group(1)) for m in found)


def model_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def carry_config(source: Any, target_cls: type, family: str, set_here: dict[str, Any],
                 handled: frozenset[str]) -> Any:
    """A `target_cls` config: every field both classes declare copied from `source`, then `set_here`.

    A field only the source class declares must be in `handled` (checked or translated by the
    family) or at its default: anything else is a setting `family` has no way to express.
    """
    import transformers

    # PreTrainedConfig's own fields (labels, dtype, architectures) describe no layer; transformers sets them.
    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    theirs = {f.name for f in dataclasses.fields(target_cls)}
    kwargs = {}
    for f in dataclasses.fields(type(source)):
        if f.name in base or f.name in handled or f.name in set_here:
            continue
        value = getattr(source, f.name)
        if f.name in theirs:
            kwargs[f.name] = value
        elif value != _default(f):
            raise MoeifyError(f"{family} has no counterpart of {type(source).__name__}.{f.name}={value!r}: "
                              "export this model to onnx instead")
    return target_cls(**kwargs, **set_here)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def fused_tensors(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with each Switch layer in the fused layout transformers' MoE blocks hold:
    `gate.weight` (E, d_model), `experts.gate_up_proj` (E, 2 d_ff, d_model), `experts.down_proj`."""
    layers = switch_layers(model)
    owned = tuple(f"{name}." for name in layers)
    tensors = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith(owned)}
    for name, layer in layers.items():
        ex = layer.experts
        if not ex.gated or ex.b_in is not None or ex.b_out is not None:
            raise MoeifyError(f"{name} has no gated bias-free experts: {BUG}")
        # The router weight takes the model dtype: transformers computes router logits in it.
        tensors[f"{name}.gate.weight"] = layer.router.weight.detach().to(dtype)
        # Gate rows first: the experts' forward splits x @ gate_up_proj[e].T as .chunk(2) -> (gate, up).
        tensors[f"{name}.experts.gate_up_proj"] = torch.cat([ex.w_gate, ex.w_in], dim=1).detach()
        tensors[f"{name}.experts.down_proj"] = ex.w_out.detach()
    return tensors


def routing_notes(moe: MoEConfig, family: str, moe_layers: int, dtype: torch.dtype) -> list[str]:
    """What a user of the exported checkpoint should know about its routing, shared by both families."""
    notes = []
    if not moe.dropless:
        notes.append(f"{family} never drops tokens, but this model was converted with a capacity limit (not "
                     "dropless): outputs equal moeify's only where moeify's capacity drops none")
    if dtype != getattr(torch, moe.router_dtype):
        notes.append(f"the router weight is stored in {str(dtype).removeprefix('torch.')}, the model's dtype, in "
                     f"which {family} computes router logits (moeify: {moe.router_dtype}): near-tied experts may "
                     "be chosen differently")
    if moe_layers > 1 and moe.aux_loss_coef:
        notes.append(f"router_aux_loss_coef is moeify's aux_loss_coef ({moe.aux_loss_coef}), but transformers "
                     f"pools the {moe_layers} MoE layers into one load-balancing loss where moeify adds one per "
                     f"layer: in training it balances about {moe_layers} times less")
    if moe.z_loss_coef:
        notes.append(f"{family} has no router z-loss: z_loss_coef ({moe.z_loss_coef}) is not carried over "
                     "(training only)")
    if moe.expert_dropout:
        notes.append(f"{family} experts have no dropout: expert_dropout ({moe.expert_dropout}) is not carried "
                     "over (training only)")
    return notes
