"""What a training loop asks for: DataConfig in, the corpus, its objective and its train and validation batches out."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moeify.errors import MoeifyError, opt
from moeify.training.batches import DataPosition, TrainBatches, validation_batches
from moeify.training.corpus import VALIDATION_FRACTION, Corpus, load_corpus
from moeify.training.masked_lm import MASK_RATE
from moeify.training.objectives import Objective, make_objective, objective_for
from moeify.training.span_corruption import MEAN_NOISE_SPAN, NOISE_DENSITY
from moeify.training.tokens import Tokens, model_tokens


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class DataConfig:
    """The data side of a training run; each default lives here or in the module the help names."""

    text: Path | None = _field(None, "a UTF-8 file or a directory of text files [default: the Python standard "
                                     "library's source]")
    data: Path | None = _field(None, 'a JSONL file with a "text" string per line')
    seq_len: int = _field(128, "model input tokens per sequence (span corruption: the encoder's)")
    batch_size: int = _field(8, "sequences per batch")
    seed: int = _field(0, "seed of the split, the example order and every objective draw")
    validation_fraction: float = _field(VALIDATION_FRACTION, "fraction of documents (files or lines) held out")
    validation_batches: int = _field(4, "validation batches, the same ones every evaluation")
    noise_density: float = _field(NOISE_DENSITY, "span corruption: fraction of tokens corrupted")
    mean_noise_span: float = _field(MEAN_NOISE_SPAN, "span corruption: mean corrupted span length")
    mask_rate: float = _field(MASK_RATE, "masked LM: fraction of tokens predicted")

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "validation_batches"):
            if getattr(self, name) < 1:
                raise MoeifyError(f"{opt(name, getattr(self, name))} must be at least 1")
        for name in ("validation_fraction", "noise_density", "mask_rate"):
            if not 0 < getattr(self, name) < 1:
                raise MoeifyError(f"{opt(name, getattr(self, name))} must be between 0 and 1")
        if self.mean_noise_span < 1:
            raise MoeifyError(f"{opt('mean_noise_span', self.mean_noise_span)} must be at least 1 (tokens)")


@dataclass(frozen=True)
class TrainingData:
    corpus: Corpus  # corpus.describe(): the lines the CLI prints
    tokens: Tokens
    objective: Objective
    train: TrainBatches  # next(train) is the next batch; train.position goes into a checkpoint
    validation: list[dict]  # fixed batches, the same every evaluation


def prepare_data(model: nn.Module, config: DataConfig = DataConfig(), tokenizer: Any = None,
                 position: DataPosition | None = None) -> TrainingData:
    """The objective `model`'s head trains on, its text tokenised by `tokenizer` (None: UTF-8 bytes), and
    the batches, the training stream continuing from `position` when a checkpoint saved one."""
    kind = objective_for(model)
    tokens = model_tokens(model.config.vocab_size, tokenizer)
    objective = make_objective(kind, tokens, config.seq_len, noise_density=config.noise_density,
                               mean_noise_span=config.mean_noise_span, mask_rate=config.mask_rate)
    # Learned position embeddings end somewhere (GPT-2 1024, BERT 512); T5's relative positions do not.
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max(objective.input_length, objective.label_length) > limit:
        raise MoeifyError(f"{opt('seq_len', config.seq_len)} is longer than the {limit} positions "
                          f"{type(model).__name__} has: use a seq_len of at most {limit}")
    corpus = load_corpus(tokens, config.text, config.data, config.validation_fraction, config.seed)
    return TrainingData(corpus, tokens, objective,
                        TrainBatches(corpus.train.ids, objective, config.batch_size, config.seed, position),
                        validation_batches(corpus.validation.ids, objective, config.batch_size,
                                           config.validation_batches, config.seed))
