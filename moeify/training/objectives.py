"""Which objective trains a model (span corruption, causal LM, masked LM) and its fixed shapes for a sequence length."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from moeify.errors import MoeifyError, opt
from moeify.training.masked_lm import MASK_RATE, masked_lm
from moeify.training.span_corruption import (
    MEAN_NOISE_SPAN,
    NOISE_DENSITY,
    example_lengths,
    span_corruption,
    span_counts,
)
from moeify.training.tokens import Tokens

SPAN_CORRUPTION, CAUSAL_LM, MASKED_LM = "span_corruption", "causal_lm", "masked_lm"


@dataclass(frozen=True)
class Objective:
    """An objective at fixed shapes: each row takes `example_length` stream tokens and gives
    `input_ids` of `input_length` and `labels` of `label_length` tokens."""

    kind: str  # SPAN_CORRUPTION, CAUSAL_LM or MASKED_LM
    example_length: int
    input_length: int
    label_length: int
    make: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]  # (window, generator) -> inputs

    def __call__(self, window: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.make(window, generator)


def causal_lm(window: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """`labels` are `input_ids` unshifted: every transformers *ForCausalLM loss (ForCausalLMLoss) shifts
    them itself, so position t is scored on token t + 1 and the last position on nothing. No randomness."""
    return {"input_ids": window, "labels": window.clone()}


def _class_names(mapping: dict) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():  # a class name, or a tuple of them
        names.update([value] if isinstance(value, str) else value)
    return names


def objective_for(model: nn.Module) -> str:
    """The objective a model's head trains on: span corruption for a text encoder-decoder with an LM head
    (T5, BART, Switch), causal LM for a *ForCausalLM / *LMHeadModel, masked LM for a *ForMaskedLM; the
    kinds come from transformers' own auto-class tables, so a model without such a head is refused."""
    from transformers.models.auto import modeling_auto as auto

    name = type(model).__name__
    if name in _class_names(auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        return SPAN_CORRUPTION
    if name in _class_names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return CAUSAL_LM
    if name in _class_names(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        return MASKED_LM
    raise MoeifyError(f"{name} has no language-modelling head to train on text: use a model of a "
                      "*ForConditionalGeneration (span corruption), *ForCausalLM (causal LM) or *ForMaskedLM "
                      "(masked LM) class")


def make_objective(kind: str, tokens: Tokens, seq_len: int, *, noise_density: float = NOISE_DENSITY,
                   mean_noise_span: float = MEAN_NOISE_SPAN, mask_rate: float = MASK_RATE) -> Objective:
    """`kind` (from objective_for) with `seq_len` model input tokens per row (span corruption: the encoder's)."""
    if kind == SPAN_CORRUPTION:
        raw, label_length = example_lengths(seq_len, noise_density, mean_noise_span)
        spans = span_counts(raw, noise_density, mean_noise_span)[1]
        if tokens.eos_id is None:
            raise MoeifyError(f"the {tokens.name} tokenizer has no EOS token, which span corruption ends its "
                              "inputs and targets with: use the model's own tokenizer")
        if spans > len(tokens.sentinel_ids):
            raise MoeifyError(f"span corruption of {opt('seq_len', seq_len)} makes {spans} noise spans but "
                              f"{tokens.name} has {len(tokens.sentinel_ids)} sentinel ids: use a shorter seq_len")
        make = partial(span_corruption, sentinel_ids=tokens.sentinel_ids, eos_id=tokens.eos_id,
                       density=noise_density, mean_span=mean_noise_span)
        return Objective(kind, raw, seq_len, label_length, make)
    if kind == CAUSAL_LM:
        return Objective(kind, seq_len, seq_len, seq_len, causal_lm)
    if kind == MASKED_LM:
        if tokens.mask_id is None:
            raise MoeifyError(f"the {tokens.name} tokenizer has no mask token, which masked LM needs: use the "
                              "model's own tokenizer")
        make = partial(masked_lm, mask_id=tokens.mask_id, random_ids=tokens.random_ids, rate=mask_rate)
        return Objective(kind, seq_len, seq_len, seq_len, make)
    raise ValueError(f"unknown objective {kind!r}")  # a programming error: kinds come from objective_for
