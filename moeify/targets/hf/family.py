"""HFCheckpoint: what a family's to_hf() hands the writer (a transformers class, its config, every tensor)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class HFCheckpoint:
    """A checkpoint in a transformers class's own terms, checked and written by write_hf.

    `tensors` uses the state-dict names and layouts of `model_class` as built in memory (for
    Mixtral and Qwen3-MoE that is the fused `experts.gate_up_proj` / `experts.down_proj`);
    transformers' save_pretrained writes the hub layout that vLLM, llama.cpp converters and
    mergekit read, and its loader converts back.
    """

    model_class: str  # a class that ships with transformers, e.g. "MixtralForCausalLM"
    config: Any  # its transformers PretrainedConfig
    tensors: dict[str, torch.Tensor]  # every tensor of the class, by its state-dict name
    notes: list[str] = field(default_factory=list)  # what users should know (capacity mapping, ...)
