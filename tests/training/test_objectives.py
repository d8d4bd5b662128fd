"""Objectives against hand-worked examples: T5 span corruption, BERT masked LM, causal LM; which model gets which."""
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

import moeify
from moeify.checkpoint.sources import load_dense
from moeify.errors import MoeifyError
from moeify.training.masked_lm import masked_lm
from moeify.training.objectives import CAUSAL_LM, MASKED_LM, SPAN_CORRUPTION, causal_lm, make_objective, objective_for
from moeify.training.span_corruption import (
    corrupt,
    example_lengths,
    random_spans_noise_mask,
    span_corruption,
    span_counts,
)
from moeify.training.tokens import Tokens, byte_tokens

S0, S1, S2 = 383, 382, 381  # the first sentinels of a 384-id vocabulary: the highest ids, descending (T5)
EOS = 1


def test_a_hand_made_mask_becomes_sentinel_inputs_and_span_targets():
    tokens = torch.arange(10, 20)
    mask = torch.tensor([0, 0, 1, 1, 0, 0, 0, 1, 1, 0], dtype=torch.bool)  # spans 12 13 and 17 18
    inputs, targets = corrupt(tokens, mask, torch.tensor([S0, S1, S2]), EOS)
    assert inputs.tolist() == [10, 11, S0, 14, 15, 16, S1, 19, EOS]
    assert targets.tolist() == [S0, 12, 13, S1, 17, 18, EOS]
    # A span at the very start and one at the very end.
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    inputs, targets = corrupt(tokens, mask, torch.tensor([S0, S1, S2]), EOS)
    assert inputs.tolist() == [S0, 11, 12, 13, 14, 15, 16, 17, S1, EOS]
    assert targets.tolist() == [S0, 10, S1, 18, 19, EOS]


def test_seed_0_corrupts_40_tokens_as_worked_by_hand():
    # 40 tokens: round(40 * 0.15) = 6 noise tokens in round(6 / 3) = 2 spans. torch.randperm(5) under
    # seed 0 starts with 4: the second noise run starts after item 4 -> noise runs [5, 1]. The next
    # draw, randperm(33), starts with 19 -> non-noise runs [20, 14]. Interleaved from non-noise:
    # 20 kept (100..119), 5 noise (120..124), 14 kept (125..138), 1 noise (139).
    assert span_counts(40) == (6, 2)
    mask = random_spans_noise_mask(40, torch.Generator().manual_seed(0))
    assert mask.nonzero().flatten().tolist() == [20, 21, 22, 23, 24, 39]
    out = span_corruption(torch.arange(100, 140).reshape(1, 40), torch.Generator().manual_seed(0), (S0, S1, S2), EOS)
    assert out["input_ids"].tolist() == [list(range(100, 120)) + [S0] + list(range(125, 139)) + [S1, EOS]]
    assert out["labels"].tolist() == [[S0, 120, 121, 122, 123, 124, S1, 139, EOS]]


def test_lengths_are_t5s_for_an_encoder_of_512():
    # T5 / transformers' run_t5_mlm: 568 raw tokens -> 85 noise in 28 spans -> 483 + 28 + EOS = 512
    # encoder tokens, 85 + 28 + EOS = 114 target tokens.
    assert example_lengths(512) == (568, 114)
    assert span_counts(568) == (85, 28)
    assert example_lengths(128) == (141, 29)


def test_too_short_an_encoder_is_refused():
    with pytest.raises(MoeifyError, match=r"^seq_len=9 is too short for span corruption: its sentinels and EOS need "
                                          r"more room than the noise frees; use a seq_len of at least 10$"):
        example_lengths(9)


@pytest.mark.parametrize("length", [10, 17, 40, 141, 568])
def test_every_token_appears_once_and_the_noise_is_t5s_count(length):
    sentinels = tuple(range(10_000, 9_000, -1))
    for seed in range(20):
        mask = random_spans_noise_mask(length, torch.Generator().manual_seed(seed))
        noise, spans = span_counts(length)
        assert len(mask) == length and int(mask.sum()) == noise  # round(length * 0.15) noise tokens
        starts = mask & ~torch.cat([mask.new_zeros(1), mask[:-1]])
        assert int(starts.sum()) == spans and not mask[0] and mask[-1]  # non-noise first, noise last
        tokens = torch.arange(length) + 3
        inputs, targets = corrupt(tokens, mask, torch.tensor(sentinels), EOS)
        assert (len(inputs), len(targets)) == (length - noise + spans + 1, noise + spans + 1)
        # Putting each sentinel's span back into the inputs gives the text back, each token once.
        spans_of = {}
        for t in targets[:-1].tolist():
            if t in sentinels:
                current = spans_of.setdefault(t, [])
            else:
                current.append(t)
        rebuilt = [t for i in inputs[:-1].tolist() for t in (spans_of[i] if i in sentinels else [i])]
        assert rebuilt == tokens.tolist()
        assert inputs[-1] == targets[-1] == EOS
        assert [t for t in inputs.tolist() if t in sentinels] == list(sentinels[:spans])  # in order


def test_masked_lm_seed_0_as_worked_by_hand():
    # round(10 * 0.15) = 2 positions per row. Under seed 0 the draws are: positions (argsort of
    # rand(2, 10)) [2, 3] and [2, 8]; choices [0.68, 0.92] and [0.40, 0.87]; random ids [5, 8] and
    # [4, 8]. Row 0: 12 -> [MASK] (< 0.8), 13 kept (>= 0.9). Row 1: 22 -> [MASK], 28 -> random 8.
    out = masked_lm(torch.arange(10, 30).reshape(2, 10), torch.Generator().manual_seed(0), mask_id=99,
                    random_ids=(3, 9))
    assert out["input_ids"].tolist() == [[10, 11, 99, 13, 14, 15, 16, 17, 18, 19],
                                         [20, 21, 99, 23, 24, 25, 26, 27, 8, 29]]
    assert out["labels"].tolist() == [[-100, -100, 12, 13, -100, -100, -100, -100, -100, -100],
                                      [-100, -100, 22, -100, -100, -100, -100, -100, 28, -100]]


def test_masked_lm_predicts_15_percent_with_bert_80_10_10():
    window = torch.randint(3, 259, (64, 100), generator=torch.Generator().manual_seed(1))
    out = masked_lm(window, torch.Generator().manual_seed(2), mask_id=383, random_ids=(3, 259))
    picked = out["labels"] != -100
    assert picked.sum(dim=1).tolist() == [15] * 64  # exactly round(100 * 0.15) per row
    assert torch.equal(out["labels"][picked], window[picked])
    assert torch.equal(out["input_ids"][~picked], window[~picked])
    masked = (out["input_ids"][picked] == 383).float().mean().item()
    changed = ((out["input_ids"][picked] != 383) & (out["input_ids"][picked] != window[picked])).float().mean().item()
    assert abs(masked - 0.8) < 0.05 and 0.05 < changed < 0.12  # 10% random, a few of which hit the same byte


def test_causal_lm_labels_are_the_inputs_and_transformers_shifts_them():
    window = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = causal_lm(window)
    assert out["input_ids"].tolist() == out["labels"].tolist() == window.tolist()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=8, n_layer=1, n_head=2, n_positions=8)).eval()
    result = model(**out)
    # Position t is scored on token t + 1: the loss transformers computes is the shifted one.
    shifted = F.cross_entropy(result.logits[:, :-1].reshape(-1, 16), window[:, 1:].reshape(-1))
    assert torch.allclose(result.loss, shifted)


def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def test_each_head_gets_its_objective():
    t5 = T5Config(d_model=8, d_ff=16, d_kv=4, num_heads=2, num_layers=1, vocab_size=32)
    bert = BertConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    assert objective_for(_meta(T5ForConditionalGeneration, t5)) == SPAN_CORRUPTION
    # BART's class is also in transformers' masked-LM table: the encoder-decoder table wins.
    assert objective_for(_meta(BartForConditionalGeneration, BartConfig(
        vocab_size=32, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16))) == SPAN_CORRUPTION
    assert objective_for(_meta(GPT2LMHeadModel, GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2))) == CAUSAL_LM
    assert objective_for(_meta(LlamaForCausalLM, LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))) == CAUSAL_LM
    assert objective_for(_meta(BertForMaskedLM, bert)) == MASKED_LM
    for model in (_meta(BertModel, bert), _meta(T5EncoderModel, t5), torch.nn.Linear(2, 2)):
        with pytest.raises(MoeifyError) as e:
            objective_for(model)
        assert str(e.value) == (f"{type(model).__name__} has no language-modelling head to train on text: use a model "
                                "of a *ForConditionalGeneration (span corruption), *ForCausalLM (causal LM) or "
                                "*ForMaskedLM (masked LM) class")


def test_a_span_batch_trains_converted_t5_tiny():
    dense = load_dense("t5-tiny").model
    assert (dense.config.d_model, dense.config.d_ff, dense.config.num_layers, dense.config.num_decoder_layers,
            dense.config.num_heads, dense.config.d_kv, dense.config.vocab_size) == (128, 512, 4, 4, 4, 32, 384)
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=2))
    objective = make_objective(objective_for(model), byte_tokens(384), 32)
    assert (objective.kind, objective.example_length, objective.input_length, objective.label_length) == (
        SPAN_CORRUPTION, 34, 32, 8)
    batch = objective(torch.randint(3, 259, (2, 34), generator=torch.Generator().manual_seed(0)),
                      torch.Generator().manual_seed(1))
    out = model(**batch)  # T5 shifts labels right into its decoder inputs
    assert out.logits.shape == (2, 8, 384)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits.reshape(-1, 384), batch["labels"].reshape(-1)))
    out.loss.backward()


def test_objectives_refuse_what_their_tokens_cannot_write():
    # 2048 encoder tokens: 2274 raw -> round(341.1) = 341 noise in round(113.7) = 114 spans (2274 - 341 + 114 + 1);
    # 372 ids hold 372 - 259 = 113 above the byte tokens.
    assert example_lengths(2048)[0] == 2274 and span_counts(2274) == (341, 114)
    with pytest.raises(MoeifyError, match=r"^span corruption of seq_len=2048 makes 114 noise spans but utf-8 bytes "
                                          r"has 113 sentinel ids: use a shorter seq_len$"):
        make_objective(SPAN_CORRUPTION, byte_tokens(372), 2048)
    assert make_objective(SPAN_CORRUPTION, byte_tokens(373), 2048).label_length == 341 + 114 + 1
    no_mask = Tokens("WordLevel", 384, None, None, (383,), (0, 300))
    with pytest.raises(MoeifyError, match=r"^the WordLevel tokenizer has no mask token, which masked LM needs"):
        make_objective(MASKED_LM, no_mask, 16)
    with pytest.raises(MoeifyError, match=r"^the WordLevel tokenizer has no EOS token, which span corruption"):
        make_objective(SPAN_CORRUPTION, no_mask, 16)
