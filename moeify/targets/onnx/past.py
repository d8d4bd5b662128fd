"""KV-cache graphs in optimum's with-past layouts: flat past_key_values.* in, flat present.* out.

T5 (`text2text-generation-with-past`): `decoder_model.onnx` runs the first step and also returns
every layer's self- and cross-attention K/V (`present.{i}.decoder/encoder.key/value`, shape
[batch, heads, length, head_dim]); `decoder_with_past_model.onnx` takes them back as
`past_key_values.*` with one new token per sequence and returns logits and the grown self-attention
K/V only (the cross-attention K/V never change). Decoder-only (`text-generation-with-past`): one
`model.onnx` with `past_key_values.{i}.key/value`, empty on the first step. The TorchScript exporter
sees tensors only, so each wrapper takes the flat tensors, builds transformers' cache objects and
flattens the cache the model returns.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from moeify.targets.onnx.graphs import Graph, _dtype, _ids, _mask

DECODER_PAST = "past_decoder_sequence_length"
DECODER_PRESENT = "past_decoder_sequence_length + 1"  # optimum's name, on both decoders' outputs
ENCODER_PAST = "encoder_sequence_length_out"


def cache_names(prefix: str, layers: int, cross: bool) -> list[str]:
    """Per layer: decoder.key, decoder.value (then encoder.key, encoder.value), as optimum flattens them."""
    parts = ("decoder.key", "decoder.value") + (("encoder.key", "encoder.value") if cross else ())
    return [f"{prefix}.{i}.{p}" for i in range(layers) for p in parts]


def _cache_axes(names: list[str], decoder_length: str) -> dict[str, dict[int, str]]:
    return {n: {0: "batch_size", 2: ENCODER_PAST if ".encoder." in n else decoder_length} for n in names}


def _flat(cache: EncoderDecoderCache, cross: bool) -> list[torch.Tensor]:
    flat = []
    for own, other in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
        flat += [own.keys, own.values] + ([other.keys, other.values] if cross else [])
    return flat


class _DecoderWithPresent(nn.Module):
    """decoder_model.onnx of a with-past export: logits, then every layer's K/V for the next step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask):
        out = self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                         decoder_input_ids=input_ids, use_cache=True)
        return (out.logits, *_flat(out.cache, cross=True))


class _DecoderWithPast(nn.Module):
    """decoder_with_past_model.onnx: one new token per sequence against the cached K/V."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_attention_mask, *past):
        cache = EncoderDecoderCache(DynamicCache(list(zip(past[0::4], past[1::4]))),
                                    DynamicCache(list(zip(past[2::4], past[3::4]))))
        # The cross-attention reads the cached K/V, never the encoder states, but T5 only runs it when
        # states are given: a placeholder of the right shape, derived from the mask, which the graph drops.
        d_model = self.model.config.d_model
        states = encoder_attention_mask[..., None].to(past[2].dtype).expand(-1, -1, d_model)
        out = self.model(encoder_outputs=(states,), attention_mask=encoder_attention_mask,
                         decoder_input_ids=input_ids, cache=cache, use_cache=True)
        return (out.logits, *_flat(out.cache, cross=False))


def seq2seq_decoders(model: nn.Module) -> list[Graph]:
    """decoder_model.onnx with present.* outputs, and decoder_with_past_model.onnx."""
    config = model.config
    layers, heads, head_dim = config.num_decoder_layers, config.num_heads, config.d_kv
    vocab, d_model, dtype = config.vocab_size, config.d_model, _dtype(model)
    enc_axes = {0: "batch_size", 1: "encoder_sequence_length"}
    dec_axes = {0: "batch_size", 1: "decoder_sequence_length"}

    def first_sample(batch, seq, seed):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(batch, seq, d_model, generator=g, dtype=dtype)
        return _ids(vocab, batch, max(1, seq // 2), g), hidden, _mask(batch, seq)

    def past_sample(batch, seq, seed):
        """One new token; a decoder past of seq // 2 positions, an encoder past of seq."""
        g = torch.Generator().manual_seed(seed)
        past = []
        for _ in range(layers):
            for length in (max(1, seq // 2),) * 2 + (seq,) * 2:
                past.append(torch.randn(batch, heads, length, head_dim, generator=g, dtype=dtype))
        return (_ids(vocab, batch, 1, g), _mask(batch, seq), *past)

    present_all, present_own = cache_names("present", layers, True), cache_names("present", layers, False)
    past_names = cache_names("past_key_values", layers, True)
    return [
        Graph("decoder_model.onnx", _DecoderWithPresent(model),
              ["input_ids", "encoder_hidden_states", "encoder_attention_mask"], ["logits", *present_all],
              {"input_ids": dec_axes, "encoder_hidden_states": enc_axes, "encoder_attention_mask": enc_axes,
               "logits": dec_axes, **_cache_axes(present_all, DECODER_PRESENT)}, first_sample),
        Graph("decoder_with_past_model.onnx", _DecoderWithPast(model),
              ["input_ids", "encoder_attention_mask", *past_names], ["logits", *present_own],
              {"input_ids": {0: "batch_size"}, "encoder_attention_mask": enc_axes,
               **_cache_axes(past_names, DECODER_PAST), "logits": dec_axes,
               **_cache_axes(present_own, DECODER_PRESENT)}, past_sample),
    ]


class _CausalLMWithPast(nn.Module):
    """model.onnx of a decoder-only with-past export: new tokens against the cached K/V (empty at first)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(list(zip(past[0::2], past[1::2])))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        return (out.logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)])


def causal_lm_with_past(model: nn.Module) -> Graph:
    """optimum's text-generation-with-past model.onnx: input_ids, attention_mask (past and new positions),
    position_ids, past_key_values.{i}.key/value in; logits, present.{i}.key/value out."""
    config = model.config.get_text_config(decoder=True)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab, dtype = config.vocab_size, _dtype(model)

    def sample(batch, seq, seed):
        """seq // 2 cached positions and the rest new, the last row padded (its mask and positions)."""
        g = torch.Generator().manual_seed(seed)
        past_len = seq // 2
        mask = _mask(batch, seq)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, past_len:]
        past = [torch.randn(batch, kv_heads, past_len, head_dim, generator=g, dtype=dtype) for _ in range(2 * layers)]
        return (_ids(vocab, batch, seq - past_len, g), mask, positions, *past)

    names = [f"{{}}.{i}.{p}" for i in range(layers) for p in ("key", "value")]
    past_names, present = [n.format("past_key_values") for n in names], [n.format("present") for n in names]
    seq_axes, total = {0: "batch_size", 1: "sequence_length"}, "past_sequence_length + sequence_length"
    return Graph("model.onnx", _CausalLMWithPast(model), ["input_ids", "attention_mask", "position_ids", *past_names],
                 ["logits", *present],
                 {"input_ids": seq_axes, "attention_mask": {0: "batch_size", 1: total}, "position_ids": seq_axes,
                  **{n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names}, "logits": seq_axes,
                  **{n: {0: "batch_size", 2: total} for n in present}}, sample)
