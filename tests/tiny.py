"""Tiny models for tests: T5 v1.0 / v1.1 from transformers, a nanoGPT-style MLP net, one Switch layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

VOCAB = 64


def tiny_t5_config(ff: str = "relu", **overrides) -> T5Config:
    kw = dict(vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=4, dropout_rate=0.0,
              feed_forward_proj=ff, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
              architectures=["T5ForConditionalGeneration"])
    kw.update(overrides)
    return T5Config(**kw)


def tiny_t5(ff: str = "relu", seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_t5_config(ff, **overrides)).eval()


def t5_batch(seed: int = 0, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(2, VOCAB, (batch, seq), generator=g),
            "decoder_input_ids": torch.randint(2, VOCAB, (batch, 5), generator=g)}


class MLP(nn.Module):
    """nanoGPT's MLP: Linear -> GELU (functional, tanh) -> Linear -> Dropout."""

    def __init__(self, d: int = 8, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d, bias=bias)
        self.c_proj = nn.Linear(4 * d, d, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        return x + self.mlp(self.ln(x))


class Net(nn.Module):
    def __init__(self, d: int = 8, layers: int = 4) -> None:
        super().__init__()
        self.h = nn.ModuleList([Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return self.head(x)


def tiny_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def tiny_switch(num_experts=4, d=8, f=16, gated=False, bias=False, act=None, **routing):
    """One SwitchFFN with seeded random router, experts and biases (RoutingConfig fields as keywords)."""
    from moeify.config import RoutingConfig
    from moeify.layers import SwitchFFN

    layer = SwitchFFN(d, f, RoutingConfig(num_experts=num_experts, **routing), act or nn.GELU(),
                      gated=gated, bias=bias)
    g = torch.Generator().manual_seed(0)
    layer.router.reset_parameters(1.0, g)
    layer.experts.reset_parameters(1.0, g)
    for b in (layer.experts.b_in, layer.experts.b_gate, layer.experts.b_out):
        if b is not None:
            nn.init.normal_(b, generator=g)
    return layer
