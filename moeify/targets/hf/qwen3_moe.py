"""hf-qwen3-moe: a Qwen3MoeForCausalLM checkpoint from a converted Qwen3ForCausalLM."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moeify.checkpoint.store import conversion_metadata
from moeify.config import MoEConfig
from moeify.conversion.moefy import expert_d_ff
from moeify.errors import MoeifyError
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

TARGET = "hf-qwen3-moe"
# Qwen3 fields Qwen3MoeConfig lacks or reads differently, translated in qwen3_moe_config.
HANDLED = frozenset({"head_dim", "layer_types", "max_window_layers", "use_sliding_window", "sliding_window"})


def refuse(meta: dict, flags: dict) -> None:
    """Refuse, from moeify.json alone, a model Qwen3-MoE cannot hold exactly."""
    require_source(meta, TARGET)
    qwen3_moe_config(dense_config(meta), MoEConfig.from_dict(meta["moe_config"]), converted_layers(meta),
                     torch.float32)


def sparse_layout(layers: list[int], depth: int) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) under which exactly `layers` are sparse.

    transformers makes layer i sparse when i is not in mlp_only_layers and (i + 1) % step == 0.
    The step is the largest that keeps every converted layer sparse (every=2 gives 2); the
    layers it would also make sparse are listed as MLP-only.
    """
    step = math.gcd(*(i + 1 for i in layers))
    return step, [i for i in range(depth) if (i + 1) % step == 0 and i not in layers]


def _window(dense: Any) -> dict[str, Any]:
    # Qwen3 slides the attention window per layer (layer_types); Qwen3-MoE in all layers or none.
    types = list(dense.layer_types)
    if set(types) == {"full_attention"}:
        return {"use_sliding_window": False, "sliding_window": None}
    if set(types) == {"sliding_attention"}:
        return {"use_sliding_window": True, "sliding_window": dense.sliding_window}
    sliding = [i for i, t in enumerate(types) if t != "full_attention"]
    raise MoeifyError(f"Qwen3-MoE slides the attention window in every layer or in none, but this Qwen3 model "
                      f"slides it in {len(sliding)} of {len(types)} layers (layer_types): export it to onnx instead")


def qwen3_moe_config(dense: Any, moe: MoEConfig, layers: list[int], dtype: torch.dtype) -> Any:
    """Qwen3MoeConfig of the dense Qwen3 config with moeify's routing and its converted `layers`."""
    from transformers import Qwen3MoeConfig

    step, mlp_only = sparse_layout(layers, dense.num_hidden_layers)
    routing = {"num_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "norm_topk_prob": moe.normalize_gates,
               # Upcycled or random, experts keep the dense FFN's width (moefy: d_ff / E); dense layers
               # keep intermediate_size.
               "moe_intermediate_size": expert_d_ff("model.layers.N.mlp", dense.intermediate_size, moe),
               "decoder_sparse_step": step,
               "mlp_only_layers": mlp_only, "router_aux_loss_coef": moe.aux_loss_coef,
               # Not a Qwen3MoeConfig field, but its attention and rotary embedding read it (default
               # hidden_size // heads, while Qwen3's is its own); hub Qwen3-MoE configs carry it too.
               "head_dim": dense.head_dim, "dtype": str(dtype).removeprefix("torch."), **_window(dense)}
    return carry_config(dense, Qwen3MoeConfig, "Qwen3-MoE", routing, HANDLED)


def to_hf(model: nn.Module, flags: dict) -> HFCheckpoint:
    """The converted Qwen3 `model` as a Qwen3MoeForCausalLM checkpoint."""
    meta = conversion_metadata(model)
    refuse(meta, flags)
    moe, layers, dtype = model.moeify_record.config, converted_layers(meta), model_dtype(model)
    notes = routing_notes(moe, "Qwen3-MoE", len(layers), dtype)
    if moe.jitter:
        notes.append(f"Qwen3-MoE has no router jitter: jitter ({moe.jitter}) is not carried over (training only)")
    config = qwen3_moe_config(model.config, moe, layers, dtype)
    return HFCheckpoint("Qwen3MoeForCausalLM", config, fused_tensors(model, dtype), notes)
