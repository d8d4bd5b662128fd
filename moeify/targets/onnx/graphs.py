"""The graphs a model exports as, with the input and output names optimum and onnxruntime users expect."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from moeify.errors import MoeifyError

Sample = Callable[[int, int, int], tuple[torch.Tensor, ...]]  # (batch, sequence, seed) -> inputs


@dataclass
class Graph:
    filename: str
    module: nn.Module  # computes the graph's outputs from its inputs, in input_names order
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    sample: Sample


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Decoder(nn.Module):
    """Decoder and LM head in one graph, without a KV cache: logits for every decoder position."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask):
        return self.model(encoder_outputs=(encoder_hidden_states,), attention_mask=encoder_attention_mask,
                          decoder_input_ids=input_ids, use_cache=False).logits


class _CausalLM(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def outputs(graph: Graph, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The graph's outputs in PyTorch, as a tuple whether its module returns one tensor or several."""
    with torch.no_grad():
        out = graph.module(*inputs)
    return out if isinstance(out, tuple) else (out,)


def static_sizes(graph: Graph) -> dict[str, list[int | None]]:
    """Output sizes from one small PyTorch run, None on the dynamic axes."""
    return {name: [None if i in graph.dynamic_axes.get(name, {}) else n for i, n in enumerate(t.shape)]
            for name, t in zip(graph.output_names, outputs(graph, graph.sample(1, 2, 0)))}


def _ids(vocab: int, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, seq), generator=g)


def _mask(batch: int, seq: int) -> torch.Tensor:
    """All ones but the last row, which is padded after half its length: masks get exercised."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[-1, (seq + 1) // 2:] = 0
    return mask


def transformers_graphs(model: nn.Module, with_past: bool = False) -> list[Graph]:
    config = model.config
    vocab = config.vocab_size
    if getattr(config, "is_encoder_decoder", False):
        d_model = config.d_model

        def encoder_sample(batch, seq, seed):
            return _ids(vocab, batch, seq, torch.Generator().manual_seed(seed)), _mask(batch, seq)

        def decoder_sample(batch, seq, seed):
            g = torch.Generator().manual_seed(seed)
            hidden = torch.randn(batch, seq, d_model, generator=g, dtype=_dtype(model))
            return _ids(vocab, batch, max(1, seq // 2), g), hidden, _mask(batch, seq)

        enc_axes = {0: "batch_size", 1: "encoder_sequence_length"}
        dec_axes = {0: "batch_size", 1: "decoder_sequence_length"}
        encoder = Graph("encoder_model.onnx", _Encoder(model), ["input_ids", "attention_mask"], ["last_hidden_state"],
                        {"input_ids": enc_axes, "attention_mask": enc_axes, "last_hidden_state": enc_axes},
                        encoder_sample)
        if with_past:
            from moeify.targets.onnx.past import seq2seq_decoders

            return [encoder, *seq2seq_decoders(model)]
        return [encoder, Graph("decoder_model.onnx", _Decoder(model),
                               ["input_ids", "encoder_hidden_states", "encoder_attention_mask"], ["logits"],
                               {"input_ids": dec_axes, "encoder_hidden_states": enc_axes,
                                "encoder_attention_mask": enc_axes, "logits": dec_axes}, decoder_sample)]
    if with_past:
        from moeify.targets.onnx.past import causal_lm_with_past

        return [causal_lm_with_past(model)]
    axes = {0: "batch_size", 1: "sequence_length"}

    def sample(batch, seq, seed):
        return _ids(vocab, batch, seq, torch.Generator().manual_seed(seed)), _mask(batch, seq)

    return [Graph("model.onnx", _CausalLM(model), ["input_ids", "attention_mask"], ["logits"],
                  {"input_ids": axes, "attention_mask": axes, "logits": axes}, sample)]


def module_graph(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> Graph:
    """A custom module: inputs named after forward's parameters; every axis but the last is dynamic."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in params[:len(example_inputs)]]
    if len(names) < len(example_inputs):
        names += [f"input_{i}" for i in range(len(names), len(example_inputs))]
    axes = {n: {i: f"{n}_dim{i}" for i in range(t.dim() - 1)} for n, t in zip(names, example_inputs)}
    with torch.no_grad():
        out = model(*example_inputs)
    if not isinstance(out, torch.Tensor):
        raise MoeifyError(f"{type(model).__name__}.forward returns {type(out).__name__}: moeify exports "
                          "modules that return one tensor; wrap it in a module that does")
    axes["output"] = {i: f"output_dim{i}" for i in range(out.dim() - 1)}

    def sample(batch, seq, seed):
        g = torch.Generator().manual_seed(seed)
        drawn = []
        for t in example_inputs:  # the same rank and feature size, other leading sizes
            shape = list(t.shape)
            for axis, size in list(enumerate((batch, seq)))[:max(0, t.dim() - 1)]:
                shape[axis] = size
            drawn.append(torch.randn(shape, generator=g, dtype=t.dtype) if t.is_floating_point()
                         else torch.randint(0, int(t.max()) + 1, shape, generator=g, dtype=t.dtype))
        return tuple(drawn)

    return Graph("model.onnx", model, names, ["output"], axes, sample)


def graphs_for(model: nn.Module, example_inputs: tuple[torch.Tensor, ...] | None,
               with_past: bool = False) -> list[Graph]:
    if example_inputs is not None:
        if with_past:
            raise MoeifyError("the KV-cache export (with_past) is for transformers models, not custom modules")
        return [module_graph(model, tuple(example_inputs))]
    if getattr(getattr(model, "config", None), "vocab_size", None):
        return transformers_graphs(model, with_past)
    raise MoeifyError(f"{type(model).__name__} is not a transformers model: pass example_inputs=(tensor, ...) "
                      "so that moeify knows what its forward takes")


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
