"""hf-mixtral: a MixtralForCausalLM checkpoint from a converted LlamaForCausalLM or MistralForCausalLM."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeify.checkpoint.store import conversion_metadata
from moeify.config import MoEConfig
from moeify.conversion.moefy import expert_d_ff
from moeify.errors import MoeifyError, opt
from moeify.targets.hf.decoder import (
    carry_config,
    converted_layers,
    dense_config,
    fused_tensors,
    model_dtype,
    require_source,
    routing_notes,
)
from moeify.targets.hf.family import HFCheckpoint

TARGET = "hf-mixtral"
SHOWN = 2  # dense layers named in a refusal
# LLaMA fields Mixtral lacks: the biases are refused by name below; transformers 5 never reads pretraining_tp.
HANDLED = frozenset({"attention_bias", "mlp_bias", "pretraining_tp"})


def refuse(meta: dict, flags: dict) -> None:
    """Refuse, from moeify.json alone, a model Mixtral cannot hold exactly."""
    arch = require_source(meta, TARGET)
    moe = MoEConfig.from_dict(meta["moe_config"])
    dense = dense_config(meta)
    _require_mixtral_routing(moe, converted_layers(meta), dense.num_hidden_layers)
    for name, what in (("attention_bias", "attention"), ("mlp_bias", "MLP")):
        if getattr(dense, name, False):
            raise MoeifyError(f"Mixtral has no {what} biases, but this {arch} has {name}=True: "
                              "export it to onnx instead")
    mixtral_config(dense, moe, torch.float32)  # every other field maps, or is refused by name


def _require_mixtral_routing(moe: MoEConfig, layers: list[int], depth: int) -> None:
    # Mixtral always renormalises the kept gates (top-1: gate 1) and has experts in every layer.
    dense = [f"model.layers.{i}.mlp" for i in range(depth) if i not in layers]
    problems = [f"was converted with {opt('normalize_gates', False)}"] if not moe.normalize_gates else []
    if dense:
        more = ", ..." if len(dense) > SHOWN else ""
        problems.append(f"left {len(dense)} of {depth} layers dense ({', '.join(dense[:SHOWN])}{more})")
    if problems:
        without = f" and without {opt('layers')}" if moe.layers is not None else ""
        raise MoeifyError("Mixtral renormalises the top-k gates and has experts in every layer, but this model "
                          f"{' and '.join(problems)}: convert again with {opt('normalize_gates', True)} "
                          f"{opt('every', 1)}{without}")


def mixtral_config(dense: Any, moe: MoEConfig, dtype: torch.dtype) -> Any:
    """MixtralConfig of the dense LLaMA / Mistral config with moeify's routing."""
    from transformers import MixtralConfig

    # Every Mixtral layer is sparse, so its one FFN width is the experts' (d_ff / E after --init moefy).
    routing = {"num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
               "intermediate_size": expert_d_ff("model.layers.N.mlp", dense.intermediate_size, moe),
               "router_jitter_noise": moe.jitter, "router_aux_loss_coef": moe.aux_loss_coef,
               "dtype": str(dtype).removeprefix("torch.")}
    # Mistral's sliding_window and every shared field (rope_parameters, head_dim, ...) carry over by name.
    return carry_config(dense, MixtralConfig, "Mixtral", routing, HANDLED)


def to_hf(model: nn.Module, flags: dict) -> HFCheckpoint:
    """The converted LLaMA / Mistral `model` as a MixtralForCausalLM checkpoint."""
    refuse(conversion_metadata(model), flags)
    moe, dtype = model.moeify_record.config, model_dtype(model)
    notes = routing_notes(moe, "Mixtral", model.config.num_hidden_layers, dtype)
    if moe.jitter:
        notes.append("Mixtral's router_jitter_noise scales the experts' input too, moeify's jitter only the "
                     "router's: training differs, inference does not")
    return HFCheckpoint("MixtralForCausalLM", mixtral_config(model.config, moe, dtype), fused_tensors(model, dtype),
                        notes)
