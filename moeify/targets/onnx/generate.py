"""Greedy generation in onnxruntime over an exported model, with the KV cache or without it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moeify.errors import MoeifyError
from moeify.targets.onnx.export import REPORT_FILE
from moeify.targets.onnx.session import session


class _Greedy:
    """transformers' greedy search over one export directory's sessions, opened once."""

    def __init__(self, directory: str | Path, provider: str = "cpu", threads: int = 0, spinning: bool = True) -> None:
        self.directory = Path(directory)
        ids = json.loads((self.directory / REPORT_FILE).read_text()).get("generation") or {}
        self.start = ids.get("decoder_start_token_id")
        eos = ids.get("eos_token_id")
        self.eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = ids.get("pad_token_id")
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)  # transformers' fallback
        self._open = lambda name: (session(self.directory / name, provider, threads=threads, spinning=spinning)
                                   if (self.directory / name).exists() else None)

    def greedy(self, input_ids, attention_mask, max_new_tokens: int, cache: bool = True) -> np.ndarray:
        """Token ids as model.generate(do_sample=False, num_beams=1) returns them: rows that produced
        EOS continue with the pad token, and generation stops once every row has."""
        input_ids, mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
        ids, logits = self._first(input_ids, mask, cache)
        unfinished = np.ones(len(ids), bool)
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            if self.eos:
                token = np.where(unfinished, token, self.pad)
                unfinished &= ~np.isin(token, self.eos)
            ids = np.concatenate([ids, token[:, None]], axis=1)
            if step == max_new_tokens - 1 or not unfinished.any():
                return ids
            logits = self._next(ids, cache)
        return ids


def _run_with_past(sess, inputs: dict, past: dict) -> np.ndarray:
    """Run, then replace `past` by the present.* outputs (renamed as the inputs they feed); logits."""
    names = [o.name for o in sess.get_outputs()]
    logits, *present = sess.run(None, {**inputs, **past})
    past.update((n.replace("present", "past_key_values", 1), v) for n, v in zip(names[1:], present))
    return logits


class Seq2SeqGenerator(_Greedy):
    """Encoder-decoder. With the cache, as optimum runs it: the encoder once, decoder_model.onnx on the
    start token (its present.* outputs seed the cache), then decoder_with_past_model.onnx on one token
    per step. Without it: decoder_model.onnx on the whole prefix each step. Rows start with the
    decoder start token."""

    def __init__(self, directory: str | Path, **kw) -> None:
        super().__init__(directory, **kw)
        if self.start is None:
            raise MoeifyError(f"{self.directory / REPORT_FILE} records no decoder_start_token_id")
        self.encoder, self.decoder = self._open("encoder_model.onnx"), self._open("decoder_model.onnx")
        self.with_past = self._open("decoder_with_past_model.onnx")
        if self.encoder is None or self.decoder is None:
            raise MoeifyError(f"{self.directory} holds no encoder_model.onnx and decoder_model.onnx")

    def _first(self, input_ids, mask, cache):
        if cache and self.with_past is None:
            raise MoeifyError("no decoder_with_past_model.onnx: export with OnnxOptions(with_past=True) "
                              "(moeify export --with-past)")
        hidden = self.encoder.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        ids = np.full((len(input_ids), 1), self.start, np.int64)
        self._inputs = {"input_ids": ids, "encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        if not cache:
            return ids, self.decoder.run(["logits"], self._inputs)[0]
        self._past: dict = {}
        return ids, _run_with_past(self.decoder, self._inputs, self._past)

    def _next(self, ids, cache):
        if not cache:
            return self.decoder.run(["logits"], {**self._inputs, "input_ids": ids})[0]
        mask = self._inputs["encoder_attention_mask"]
        return _run_with_past(self.with_past, {"input_ids": ids[:, -1:], "encoder_attention_mask": mask}, self._past)


class CausalGenerator(_Greedy):
    """Decoder-only (left-padded prompts, as transformers wants them). With the cache: model.onnx of a
    with-past export on the prompt with an empty past, then on one token per step. Without it: the
    whole sequence each step (with an empty past where the graph takes one). Rows start with the prompt."""

    def __init__(self, directory: str | Path, **kw) -> None:
        super().__init__(directory, **kw)
        self.model = self._open("model.onnx")
        if self.model is None:
            raise MoeifyError(f"{self.directory} holds no model.onnx")
        self.past_inputs = [i for i in self.model.get_inputs() if i.name.startswith("past_key_values.")]

    def _feed(self, ids, mask, past: dict | None = None) -> dict:
        if not self.past_inputs:
            return {"input_ids": ids, "attention_mask": mask}
        if past is None:  # empty: [batch, kv heads, 0, head_dim], the numbers from the graph
            past = {i.name: np.zeros((len(ids), i.shape[1], 0, i.shape[3]), _FLOAT[i.type]) for i in self.past_inputs}
        positions = (mask.cumsum(-1) - 1) * mask  # transformers': padding at position 0
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions[:, -ids.shape[1]:], **past}

    def _first(self, input_ids, mask, cache):
        if cache and not self.past_inputs:
            raise MoeifyError("model.onnx takes no past_key_values: export with OnnxOptions(with_past=True) "
                              "(moeify export --with-past)")
        self._mask = mask
        if not cache:
            return input_ids, self.model.run(["logits"], self._feed(input_ids, mask))[0]
        feed = self._feed(input_ids, mask)
        self._past = {k: v for k, v in feed.items() if k.startswith("past_key_values.")}
        return input_ids, _run_with_past(self.model, {k: feed[k] for k in _NEW}, self._past)

    def _next(self, ids, cache):
        self._mask = np.concatenate([self._mask, np.ones((len(ids), 1), np.int64)], axis=1)
        if not cache:
            return self.model.run(["logits"], self._feed(ids, self._mask))[0]
        feed = self._feed(ids[:, -1:], self._mask, self._past)
        return _run_with_past(self.model, {k: feed[k] for k in _NEW}, self._past)


_NEW = ("input_ids", "attention_mask", "position_ids")
_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def generator(directory: str | Path, **kw) -> _Greedy:
    """The generator for an export directory: encoder-decoder where it holds encoder_model.onnx."""
    return (Seq2SeqGenerator if (Path(directory) / "encoder_model.onnx").exists() else CausalGenerator)(directory, **kw)


def greedy(session_dir: str | Path, input_ids, attention_mask, max_new_tokens: int, cache: bool = True) -> np.ndarray:
    """Greedy generation from an export directory; see Seq2SeqGenerator and CausalGenerator."""
    return generator(session_dir).greedy(input_ids, attention_mask, max_new_tokens, cache)
