"""Batches: fixed shapes, deterministic, an epoch visits every example once, and a resumed stream continues exactly."""
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from moeify.checkpoint.sources import load_dense
from moeify.errors import MoeifyError
from moeify.training.batches import DataPosition, TrainBatches, validation_batches
from moeify.training.data import DataConfig, prepare_data
from moeify.training.objectives import CAUSAL_LM, SPAN_CORRUPTION, make_objective
from moeify.training.tokens import byte_tokens

SPANS = make_objective(SPAN_CORRUPTION, byte_tokens(384), 16)  # 17 raw tokens -> 16 encoder, 5 target tokens
CAUSAL = make_objective(CAUSAL_LM, byte_tokens(384), 4)
STREAM = torch.randint(3, 259, (7 * 17 + 5,), generator=torch.Generator().manual_seed(0))  # 7 examples + a tail


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_stream_continues_exactly_across_epochs():
    # 7 examples at batch size 2: 3 batches per epoch, so 8 batches cross two epoch boundaries.
    whole = TrainBatches(STREAM, SPANS, batch_size=2, seed=5)
    assert whole.batches_per_epoch == 3
    expected = [next(whole) for _ in range(8)]
    first = TrainBatches(STREAM, SPANS, batch_size=2, seed=5)
    for _ in range(4):
        next(first)
    saved = json.loads(json.dumps(first.position.to_dict()))  # what a checkpoint writes and reads
    assert saved == {"step": 4, "seed": 5, "train_tokens": 124, "example_length": 17, "batch_size": 2,
                     "objective": "span_corruption"}
    resumed = TrainBatches(STREAM, SPANS, batch_size=2, seed=5, position=DataPosition.from_dict(saved))
    assert resumed.epoch == 1
    assert all(_equal(next(resumed), batch) for batch in expected[4:])
    again = TrainBatches(STREAM, SPANS, batch_size=2, seed=5)
    assert all(_equal(next(again), batch) for batch in expected)  # deterministic given the seed
    other = TrainBatches(STREAM, SPANS, batch_size=2, seed=6)
    assert not _equal(next(other), expected[0])


def test_batches_have_fixed_shapes_and_an_epoch_sees_each_example_once():
    stream = torch.arange(3, 3 + 7 * 4 + 3)  # 7 causal examples of 4 tokens, 3 tokens of tail
    batches = TrainBatches(stream, CAUSAL, batch_size=2, seed=0)
    epoch = [next(batches)["input_ids"] for _ in range(3)]
    assert all(b.shape == (2, 4) for b in epoch)
    starts = sorted(int(row[0]) for b in epoch for row in b)
    assert len(set(starts)) == 6 and set(starts) <= set(range(3, 31, 4))  # 6 of the 7, none twice
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 4)) for b in epoch for row in b)
    for _ in range(5):
        batch = next(batches)
        assert batch["input_ids"].shape == (2, 4) and batch["labels"].shape == (2, 4)
    spans = next(TrainBatches(STREAM, SPANS, batch_size=3, seed=0))
    assert spans["input_ids"].shape == (3, 16) and spans["labels"].shape == (3, 5)


def test_validation_is_the_splits_first_examples_every_time():
    stream = torch.arange(3, 3 + 5 * 4)
    batches = validation_batches(stream, CAUSAL, batch_size=2, count=4, seed=0)
    assert len(batches) == 2  # 5 examples make 2 whole batches
    assert batches[0]["input_ids"].tolist() == [[3, 4, 5, 6], [7, 8, 9, 10]]
    spans = validation_batches(STREAM, SPANS, batch_size=2, count=2, seed=0)
    assert all(_equal(a, b) for a, b in zip(spans, validation_batches(STREAM, SPANS, batch_size=2, count=2, seed=0)))
    with pytest.raises(MoeifyError, match=r"^the validation split has 7 tokens, fewer than one batch of 2 x 4: give "
                                          r"more text, or raise validation_fraction$"):
        validation_batches(stream[:7], CAUSAL, batch_size=2, count=1, seed=0)


def test_a_position_from_another_run_is_refused():
    saved = TrainBatches(STREAM, SPANS, batch_size=2, seed=5).position
    with pytest.raises(MoeifyError, match=r"^the saved data position was drawn with seed 5 \(now 4\), batch_size 2 "
                                          r"\(now 3\): resume with the same text, seq_len, batch_size and seed$"):
        TrainBatches(STREAM, SPANS, batch_size=3, seed=4, position=saved)
    with pytest.raises(MoeifyError, match=r"^the checkpoint's data position \{'step': 3\} is not one moeify saved"):
        DataPosition.from_dict({"step": 3})
    with pytest.raises(MoeifyError, match=r"^the train split has 124 tokens, fewer than one batch of 8 x 17: give more "
                                          r"text, or lower batch_size or seq_len$"):
        TrainBatches(STREAM, SPANS, batch_size=8, seed=0)


def test_prepare_data_feeds_t5_tiny_from_a_directory(tmp_path):
    for i in range(20):
        (tmp_path / f"f{i:02}.txt").write_text(f"def f{i:02}(x):\n    return x * {i:02}\n" * 12)  # 12 x 30 bytes
    model = load_dense("t5-tiny").model
    data = prepare_data(model, DataConfig(text=tmp_path, seq_len=32, batch_size=4, validation_fraction=0.1,
                                          validation_batches=2))
    # round(20 * 0.1) = 2 files held out; a byte is a token, plus one EOS per file.
    assert data.corpus.describe()[1:] == ["train: 18 files, 6,480 bytes, 6,498 tokens",
                                          "validation: 2 files, 720 bytes, 722 tokens"]
    assert (data.objective.kind, data.objective.example_length, data.objective.label_length) == (SPAN_CORRUPTION, 34, 8)
    batch = next(data.train)
    assert batch["input_ids"].shape == (4, 32) and len(data.validation) == 2
    assert torch.isfinite(model(**batch).loss)


def test_prepare_data_refuses_more_positions_than_the_model_has():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=384, n_embd=8, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(MoeifyError, match=r"^seq_len=128 is longer than the 64 positions GPT2LMHeadModel has: use a "
                                          r"seq_len of at most 64$"):
        prepare_data(model, DataConfig(seq_len=128))
    with pytest.raises(MoeifyError, match=r"^validation_fraction=1.0 must be between 0 and 1: leave it unset for validation_fraction=0.05, the default$"):
        DataConfig(validation_fraction=1.0)
