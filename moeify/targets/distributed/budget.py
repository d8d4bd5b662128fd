"""Each rank refuses, before it joins the others, a step its device's memory cannot hold.

The check runs in the rank, not in `moeify run`, because only the rank knows its device: a GPU's free memory,
or on CPUs this machine's memory shared by the ranks started here (torchrun's LOCAL_WORLD_SIZE).
"""
from __future__ import annotations

import os
from pathlib import Path

from moeify.checkpoint.files import read_json
from moeify.checkpoint.metadata import MOEIFY_FILE
from moeify.planner.resources import available_memory, check_memory, saved_activation_bytes, state_bytes


def step_bytes(directory: Path, shard_bytes: int, options: dict, lengths: tuple[int, int] | None) -> int:
    """A lower bound on one rank's memory for one step: its shard's weights (with --train their gradients and
    AdamW's two moments) and the activations of --batch sequences of `lengths` (encoder or whole model, decoder);
    None: the synthetic batches' --seq and --seq // 4."""
    meta = read_json(directory / MOEIFY_FILE, fix="re-run `moeify export`")
    train = bool(options.get("train"))
    length, decoder_length = lengths or (options["seq"], max(1, options["seq"] // 4))
    return state_bytes(shard_bytes, train) + saved_activation_bytes(meta, options["batch"], length, decoder_length,
                                                                    train)


def check_step_fits(directory: Path, shard_bytes: int, options: dict, lengths: tuple[int, int] | None,
                    local_rank: int) -> None:
    """Refuse step_bytes() beyond what this rank's device can give (see the module's docstring)."""
    import torch

    if torch.cuda.is_available():
        free, where = torch.cuda.mem_get_info(local_rank)[0], f"free on cuda:{local_rank}"
    else:
        total, ranks = available_memory(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if total is None:
            return
        free, where = total // max(ranks, 1), "of memory per rank" if ranks > 1 else "of memory"
    held = "weights, gradients, AdamW state, activations" if options.get("train") else "weights, activations"
    check_memory(step_bytes(directory, shard_bytes, options, lengths), f"one step of this rank needs at least {{}} "
                 f"({held})", "lower --batch or --seq", available=free, where=where)
