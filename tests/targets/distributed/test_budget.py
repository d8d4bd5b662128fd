"""Each rank's lower bound on one step's memory (targets/distributed/budget.py), with and without --data."""
import json

import torch
from safetensors.torch import save_file

from moeify.planner.resources import Depth, activation_bytes
from moeify.targets.distributed.budget import step_bytes
from moeify.targets.distributed.entry import data_lengths


def test_data_lengths_come_from_the_files_header(tmp_path):
    both = tmp_path / "both.safetensors"
    save_file({"input_ids": torch.zeros(3, 10, dtype=torch.long), "labels": torch.zeros(3, 5, dtype=torch.long)},
              str(both))
    alone = tmp_path / "alone.safetensors"
    save_file({"input_ids": torch.zeros(3, 12, dtype=torch.long)}, str(alone))
    assert data_lengths(both) == (10, 5)
    assert data_lengths(alone) == (12, 12)  # training uses input_ids as the labels
    assert data_lengths(None) is None


def test_step_bytes_adds_the_batchs_activations_to_the_shard(dist2):
    depth = Depth.from_config(json.loads((dist2 / "moeify.json").read_text())["dense_config"])
    assert depth is not None and depth.decoder_layers > 0  # a T5: synthetic decoders take --seq // 4
    forward = step_bytes(dist2, 1000, {"batch": 2, "seq": 64}, None)
    assert forward == 1000 + activation_bytes(depth, 2, 64, 16, 4, train=False)
    train = step_bytes(dist2, 1000, {"batch": 2, "seq": 64, "train": True}, (40, 8))
    assert train == 4000 + activation_bytes(depth, 2, 40, 8, 4, train=True)  # AdamW: weights, grads, 2 moments
