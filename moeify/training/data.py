"""What a training loop asks for: DataConfig in, the corpus, its objective and its train and validation batches out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from moeify.errors import MoeifyError, opt
from moeify.training.batches import DataPosition, TrainBatches, validation_batches
from moeify.training.config import DataConfig
from moeify.training.corpus import Corpus, load_corpus
from moeify.training.objectives import Objective, make_objective, objective_for
from moeify.training.tokens import Tokens, model_tokens


@dataclass(frozen=True)
class TrainingData:
    corpus: Corpus  # corpus.describe(): the lines the CLI prints
    tokens: Tokens
    objective: Objective
    train: TrainBatches  # next(train) is the next batch; train.position goes into a checkpoint
    validation: list[dict]  # fixed batches, the same every evaluation


def source_tokenizer(source: str) -> Any:
    """A source directory's own tokenizer (a moeify directory carries a copy); presets train on UTF-8 bytes (None)."""
    from pathlib import Path

    if not Path(source).is_dir():
        return None
    from moeify.conversion.text import local_tokenizer

    return local_tokenizer([Path(source)])


def prepare_data(model: nn.Module, config: DataConfig = DataConfig(), tokenizer: Any = None,
                 position: DataPosition | None = None) -> TrainingData:
    """The objective `model`'s head trains on, its text tokenised by `tokenizer` (None: UTF-8 bytes), and
    the batches, the training stream continuing from `position` when a checkpoint saved one."""
    kind = objective_for(model)
    tokens = model_tokens(model.config.vocab_size, tokenizer)
    _check_positions(model, config.seq_len, config.seq_len)  # every objective's inputs are seq_len long
    corpus = load_corpus(tokens, config.text, config.data, config.validation_fraction, config.seed)
    # Every example holds at least seq_len tokens. Refused here, a seq_len no text could fill never reaches
    # make_objective, whose span-corruption lengths take time in proportion to it.
    train_tokens = len(corpus.train.ids)
    if config.seq_len * config.batch_size > train_tokens:
        raise MoeifyError(f"the train split has {train_tokens:,} tokens, fewer than one batch of {config.batch_size} "
                          f"x {config.seq_len}: give more text, or lower {opt('batch_size')} or {opt('seq_len')}")
    objective = make_objective(kind, tokens, config.seq_len, noise_density=config.noise_density,
                               mean_noise_span=config.mean_noise_span, mask_rate=config.mask_rate)
    _check_positions(model, max(objective.input_length, objective.label_length), config.seq_len)
    return TrainingData(corpus, tokens, objective,
                        TrainBatches(corpus.train.ids, objective, config.batch_size, config.seed, position),
                        validation_batches(corpus.validation.ids, objective, config.batch_size,
                                           config.validation_batches, config.seed))


def _check_positions(model: nn.Module, length: int, seq_len: int) -> None:
    """Learned position embeddings end somewhere (GPT-2 1024, BERT 512); T5's relative positions do not."""
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise MoeifyError(f"{opt('seq_len', seq_len)} is longer than the {limit} positions "
                          f"{type(model).__name__} has: use a seq_len of at most {limit}")
