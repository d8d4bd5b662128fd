"""What a job needs of a machine, as lower bounds (memory for weights, optimizer state and activations; disk),
and the one-line refusal when the machine cannot give it.

Commands check these before the work starts (`convert`, `calibrate`, `export`, `train`, and each rank of
`moeify run`), so every term errs low: a job refused here surely does not fit. Torch-free.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from moeify.errors import MoeifyError
from moeify.planner.workload import DTYPE_BYTES

MEMORY_FRACTION = 0.8  # of the available memory a command may plan to take
# Transformers families whose attention is always eager (T5's relative position bias): they materialise each
# layer's b x heads x s x s probabilities, which backward keeps. Fused attention (SDPA) keeps O(s) instead.
EAGER_ATTENTION = ("t5", "mt5", "umt5", "switch_transformers")
# Optimizer state tensors the size of the weights: AdamW's two moments; Adafactor's are factored (rows + columns).
OPTIMIZER_STATES = {"adamw": 2, "adafactor": 0}


@dataclass(frozen=True)
class Depth:
    """The sizes of a transformer that its activations scale with, read from its Hugging Face config."""

    d_model: int
    d_ff: int  # 0 where the config does not say
    layers: int  # encoder-decoder: the encoder's; otherwise all of them
    decoder_layers: int  # encoder-decoder only, else 0
    heads: int
    vocab: int
    eager_attention: bool = False

    @classmethod
    def from_config(cls, config: dict) -> Depth | None:
        """None when the config does not name its sizes (a custom module): its activations are not bounded."""
        if not isinstance(config, dict):
            return None

        def first(*keys: str) -> int | None:
            return next((config[k] for k in keys if isinstance(config.get(k), int) and config[k] > 0), None)

        # T5, BERT / LLaMA, GPT-2 and BART spell them differently.
        d_model = first("d_model", "hidden_size", "n_embd")
        layers = first("num_layers", "num_hidden_layers", "n_layer", "encoder_layers")
        heads, vocab = first("num_heads", "num_attention_heads", "n_head", "encoder_attention_heads"), first("vocab_size")
        if None in (d_model, layers, heads, vocab):
            return None
        d_ff = first("d_ff", "intermediate_size", "n_inner", "encoder_ffn_dim") or \
            (4 * d_model if config.get("model_type") == "gpt2" else 0)  # GPT-2's n_inner None means 4 x n_embd
        decoder = (first("num_decoder_layers", "decoder_layers") or layers) if config.get("is_encoder_decoder") else 0
        eager = config.get("model_type") in EAGER_ATTENTION or config.get("_attn_implementation") == "eager"
        return cls(d_model, d_ff, layers, decoder, heads, vocab, eager)


def activation_bytes(depth: Depth, batch: int, length: int, decoder_length: int, dtype_bytes: int,
                     train: bool) -> int:
    """What any implementation must hold, at the least. Training: per layer, for backward, the inputs and outputs of
    both norms (4 x d_model per token) and the FFN's hidden activation (d_ff), plus eager attention's probabilities;
    and the logits. Forward only: one layer's FFN input and hidden activation (and probabilities), and the logits.
    `length` feeds the encoder (or the whole model), `decoder_length` an encoder-decoder's decoder."""
    per_token = (4 * depth.d_model + depth.d_ff) if train else (depth.d_model + depth.d_ff)

    def layer(s: int) -> int:
        return batch * s * per_token + (batch * depth.heads * s * s if depth.eager_attention else 0)

    logits = batch * (decoder_length if depth.decoder_layers else length) * depth.vocab
    encoder, decoder = layer(length), layer(decoder_length) if depth.decoder_layers else 0
    held = depth.layers * encoder + depth.decoder_layers * decoder if train else max(encoder, decoder)
    return (held + logits) * dtype_bytes


def saved_activation_bytes(meta: dict, batch: int, length: int, decoder_length: int, train: bool) -> int:
    """activation_bytes() of the model a moeify.json describes (its dense_config, in its dtype); 0 where the
    config names no sizes."""
    depth = Depth.from_config(meta.get("dense_config"))
    if depth is None:
        return 0
    return activation_bytes(depth, batch, length, decoder_length, dtype_bytes(meta["summary"]), train)


def state_bytes(weight_bytes: int, train: bool, optimizer: str = "adamw") -> int:
    """Weights, and in training their gradients and the optimizer's state."""
    return weight_bytes * (2 + OPTIMIZER_STATES[optimizer]) if train else weight_bytes


def dtype_bytes(summary: dict) -> int:
    """Bytes per value of a moeify.json summary's dtype (an unlisted one, float64 say, counts 4: a lower bound)."""
    return DTYPE_BYTES.get(summary.get("dtype"), 4)


def weight_bytes(summary: dict, params: str = "total_params") -> int:
    """The bytes of a moeify.json summary's weights (`params`: total_params, dense_params) in its dtype."""
    return summary[params] * dtype_bytes(summary)


def available_memory() -> int | None:
    """Bytes a new allocation can get (MemAvailable), or None where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(need: int, what: str, fix: str, available: int | None = None, where: str = "of memory") -> None:
    """Refuse when `need` bytes exceed the share of `available` (default: this machine's memory) a command may
    take. `what` reads "... needs {} ..." with {} for the amount; `fix` says what to change."""
    available = available_memory() if available is None else available
    if available is not None and need > MEMORY_FRACTION * available:
        raise MoeifyError(f"{what.format(size(need))} but {size(available)} {where} is available: {fix}")


def size(n: float) -> str:
    """Bytes for a message: GiB from 1 GiB up, else MiB."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def free_disk(path: Path) -> tuple[int, Path] | None:
    """Free bytes on the file system that would hold `path` (made or not yet), and the folder measured."""
    where = Path(os.path.abspath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free, where
    except OSError:
        return None
