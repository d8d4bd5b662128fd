"""Calibration samples: each selected FFN site's inputs and dense outputs on real text, taken before conversion."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeify.config import MoEConfig
from moeify.conversion.find_ffn import FFNSite
from moeify.conversion.text import read_text, stdlib_text, text_batches, token_ids, window_tokens
from moeify.errors import MoeifyError, opt

# 4 x 8 sequences of 128 tokens: 4096 tokens per encoder or decoder-only site (T5 decoders see a
# quarter), enough for k-means over a few dozen experts and a second or so of dense forward passes.
BATCHES, BATCH_SIZE, SEQ_LEN = 4, 8, 128


@dataclass(frozen=True)
class SiteSamples:
    x: torch.Tensor  # (N, d_model) float32 on the CPU: what the FFN read
    y: torch.Tensor  # (N, d_model) float32 on the CPU: what the dense FFN returned


def calibration_ids(config: MoEConfig, vocab_size: int, tokenizer=None) -> torch.Tensor:
    """Token ids of config.text (a file), or of the Python standard library's source."""
    if config.text is None:
        text = stdlib_text()
    else:
        try:
            text = read_text(Path(config.text))
        except OSError as e:
            raise MoeifyError(f"{opt('text', config.text)} cannot be read ({e.strerror}): give a UTF-8 text "
                              "file, or leave it unset for the Python standard library's source") from None
    return token_ids(text, vocab_size, tokenizer)


@torch.no_grad()
def site_samples(model: nn.Module, sites: list[FFNSite], config: MoEConfig,
                 tokenizer=None) -> dict[str, SiteSamples] | None:
    """Run calibration text through the dense `model` and keep each site's FFN inputs and outputs;
    None for a model that reads no token ids when only moefy's report wanted them.

    Forward hooks on the site's first and last Linear: their input is the FFN's input and their
    output the FFN's, whatever surrounds them.
    """
    lm_config = getattr(model, "config", None)
    vocab = getattr(lm_config, "vocab_size", None)
    if vocab is None:
        if config.router_init != "hidden":
            return None  # moefy needs no text, only its report does: a custom module goes without
        raise MoeifyError(f"{opt('router_init', 'hidden')} routes calibration text through the model, but "
                          f"{type(model).__name__} has no config.vocab_size (it is not a transformers language "
                          f"model): use {opt('router_init', 'random')}")
    ids = calibration_ids(config, vocab, tokenizer)
    encoder_decoder = bool(getattr(lm_config, "is_encoder_decoder", False))
    need = window_tokens(BATCH_SIZE, SEQ_LEN)
    if len(ids) < need:
        raise MoeifyError(f"the calibration text has {len(ids)} tokens, fewer than the {need} of one batch: "
                          f"give more text with {opt('text')}")
    device = next(model.parameters()).device
    xs: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    ys: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    hooks = []
    for site in sites:
        prefix = f"{site.region}." if site.region else ""
        first, last = model.get_submodule(prefix + site.w_in), model.get_submodule(prefix + site.w_out)
        hooks.append(first.register_forward_hook(
            lambda m, args, out, name=site.name: xs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
        hooks.append(last.register_forward_hook(
            lambda m, args, out, name=site.name: ys[name].append(out.detach().reshape(-1, out.shape[-1]))))
    training = model.training
    model.eval()
    try:
        for batch in text_batches(ids, BATCHES, BATCH_SIZE, SEQ_LEN, encoder_decoder):
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return {name: SiteSamples(torch.cat(xs[name]).float().cpu(), torch.cat(ys[name]).float().cpu())
            for name in xs}
