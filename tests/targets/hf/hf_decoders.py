"""Tiny dense decoders, and the round trip convert -> save -> load -> to_hf -> write_hf -> from_pretrained."""
from __future__ import annotations

import torch
from torch import nn

import moeify
from moeify.targets.hf.family import HFCheckpoint
from moeify.targets.hf.writer import write_hf

VOCAB = 96
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, initializer_range=0.3)  # wide weights: a misplaced one moves logits a lot


def tiny(config_cls, model_cls, layers: int = 2, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**SHAPE, "num_hidden_layers": layers, **overrides})).eval()


def converted(dense: nn.Module, tmp_path, **moe) -> nn.Module:
    """`dense` converted (upcycled with noise, so that experts differ), saved and loaded back."""
    moeify.save(moeify.convert(dense, moeify.MoEConfig(**{"num_experts": 4, "upcycle_noise": 0.5, **moe})),
                tmp_path / "moe")
    return moeify.load(tmp_path / "moe").eval()


def written(ckpt: HFCheckpoint, model_cls, tmp_path) -> nn.Module:
    """`ckpt` written by write_hf and loaded by transformers, which finds every key where it expects it."""
    write_hf(ckpt, tmp_path / "hf")
    return loaded(model_cls, tmp_path / "hf")


def loaded(model_cls, path) -> nn.Module:
    model, info = model_cls.from_pretrained(path, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    return model.eval()


def batch(seq: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(moe_model: nn.Module, hf_model: nn.Module, ids: torch.Tensor) -> None:
    """Equal logits (float32, atol 1e-5) where moeify dropped no token."""
    with moeify.router_losses(moe_model) as routing:
        expected = moe_model(ids).logits
    assert routing.layers and sum(r.dropped for r in routing.layers) == 0
    torch.testing.assert_close(hf_model(ids).logits, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def assert_same_generation(moe_model: nn.Module, hf_model: nn.Module, ids: torch.Tensor) -> None:
    """Greedy decoding through the KV cache gives the same 8 new tokens."""
    kw = dict(do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    expected = moe_model.generate(ids, **kw)
    assert expected.shape == (ids.shape[0], ids.shape[1] + 8)
    assert torch.equal(hf_model.generate(ids, **kw), expected)
