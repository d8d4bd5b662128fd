"""--target hf-switch: a converted T5 v1.0-style model as transformers' SwitchTransformersForConditionalGeneration."""
from __future__ import annotations

import torch
from torch import nn

from moeify.checkpoint.hf_switch import (
    DEFAULT_SEQ_LEN,
    SWITCH_CLASS,
    stack_positions,
    switch_config_fields,
    switch_layout,
    switch_names,
)
from moeify.checkpoint.store import conversion_metadata
from moeify.config import MoEConfig, expert_capacity
from moeify.errors import MoeifyError, opt
from moeify.targets.hf.decoder import BUG, model_dtype, require_source
from moeify.targets.hf.family import HFCheckpoint

TARGET = "hf-switch"


def refuse(meta: dict, flags: dict) -> None:
    """Refuse, from moeify.json alone, a conversion SwitchTransformers cannot express, with the reason."""
    require_source(meta, TARGET)
    moe = MoEConfig.from_dict(meta["moe_config"])
    layers = meta["summary"]["moe_layers"]
    if any(layer["gated"] for layer in layers):
        raise MoeifyError("SwitchTransformers experts are Linear -> activation -> Linear; it has no gated form "
                          "(T5 v1.1, Flan-T5): export this model to onnx instead")
    d_ff = (meta.get("dense_config") or {}).get("d_ff")
    narrow = next((layer["d_ff"] for layer in layers if d_ff is not None and layer["d_ff"] != d_ff), None)
    if narrow is not None:
        raise MoeifyError(f"SwitchTransformers gives dense and expert FFNs one d_ff, but this model's experts are "
                          f"{narrow} wide and its dense FFNs {d_ff} ({opt('init', moe.init)}): export it to onnx or "
                          f"torch instead, or convert again with {opt('init', 'upcycle')}")
    if any(layer["bias"] for layer in layers):
        raise MoeifyError("SwitchTransformers FFNs have no biases, but this model's have: export it to onnx instead")
    if moe.top_k != 1:
        raise MoeifyError("SwitchTransformers routes each token to one expert, but this model was converted with "
                          f"{opt('top_k', moe.top_k)}: convert again with {opt('top_k', 1)}")
    if moe.normalize_gates:
        raise MoeifyError("SwitchTransformers scales an expert's output by its router probability, but this model "
                          f"renormalises its gates: convert again with {opt('normalize_gates', False)}")
    if moe.router_dtype != "float32":
        raise MoeifyError(f"hf-switch writes float32 routers (selective precision), but this model routes in "
                          f"{moe.router_dtype}: convert again with {opt('router_dtype', 'float32')}")
    rate = (meta.get("dense_config") or {}).get("dropout_rate")
    if moe.expert_dropout is not None and rate is not None and moe.expert_dropout != rate:
        raise MoeifyError(f"SwitchTransformers experts drop out at the model's dropout_rate ({rate}), but this "
                          f"model's at {opt('expert_dropout', moe.expert_dropout)}: convert again without "
                          f"{opt('expert_dropout')}")
    seq_len = flags.get("seq_len", DEFAULT_SEQ_LEN)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise MoeifyError(f"{opt('seq_len')} must be a positive number of tokens, got {seq_len!r}: "
                          f"try {opt('seq_len', 512)}")
    switch_layout(stack_positions(meta["sites"], meta["skipped"]))


def to_hf(model: nn.Module, flags: dict) -> HFCheckpoint:
    """The SwitchTransformersForConditionalGeneration checkpoint of a converted T5 (`moeify.load`'s model)."""
    from transformers import SwitchTransformersConfig

    refuse(conversion_metadata(model), flags)
    record = model.moeify_record
    moe, dtype, seq_len = record.config, model_dtype(model), flags.get("seq_len", DEFAULT_SEQ_LEN)
    layout = switch_layout(stack_positions(record.site_names, record.skipped))
    # transformers gives each sequence expert_capacity slots per expert; dropless: a whole sequence's.
    capacity = seq_len if moe.dropless else expert_capacity(
        seq_len, moe.num_experts, moe.eval_capacity_factor, moe.min_capacity)
    dtype_name = str(dtype).removeprefix("torch.")
    config = SwitchTransformersConfig(**switch_config_fields(model.config, moe, layout, capacity), dtype=dtype_name)
    tensors: dict[str, torch.Tensor] = {}  # expert slices share storage: write_hf copies them apart
    for name, tensor in model.state_dict().items():
        targets = switch_names(name, moe.num_experts)
        if targets is None:
            raise MoeifyError(f"SwitchTransformers has no place for {name}: {BUG}")
        for target, expert in targets:
            value = tensor if expert is None else tensor[expert]
            tensors[target] = value.detach().to(dtype)
    notes = [_capacity_note(capacity, seq_len, moe)]
    if dtype != torch.float32:
        notes.append(f"the router weight is stored in {dtype_name}, the model's dtype, as SwitchTransformers "
                     "keeps it (it routes in float32): near-tied experts may be chosen differently")
    return HFCheckpoint(SWITCH_CLASS, config, tensors, notes)


def _capacity_note(capacity: int, seq_len: int, moe: MoEConfig) -> str:
    how = (f"seq_len {seq_len}, as the model is dropless" if moe.dropless else
           f"seq_len {seq_len} and eval capacity factor {moe.eval_capacity_factor}")
    return (f"expert_capacity {capacity} (from {how}) limits each expert per sequence, in training too, where "
            "moeify's capacity factors limit it per batch: outputs agree wherever neither drops a token")
