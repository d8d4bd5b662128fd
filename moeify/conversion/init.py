"""A fresh SwitchFFN's experts and router from its dense FFN: upcycling, the paper's random init, or MoEfication."""
from __future__ import annotations

import torch

from moeify.config import MoEConfig
from moeify.conversion.dense_weights import DenseFFN
from moeify.conversion.moefy import moefy
from moeify.layers import SwitchFFN


def initialise(layer: SwitchFFN, dense: DenseFFN, config: MoEConfig, generator: torch.Generator) -> None:
    """Router: the paper's truncated normal (moefy: its clusters' centroids); experts: per config.init.

    --router-init hidden replaces the router afterwards (data_init.py), once calibration text has run.
    """
    if config.init == "moefy":
        moefy(layer, dense, generator)
        return
    layer.router.reset_parameters(config.init_scale, generator)
    if config.init == "random":
        layer.experts.reset_parameters(config.init_scale, generator)
    else:
        upcycle(layer, dense, config.upcycle_noise, generator, config.upcycle_factor)


@torch.no_grad()
def upcycle(layer: SwitchFFN, dense: DenseFFN, noise: float, generator: torch.Generator, scale: float = 1.0) -> None:
    """Sparse upcycling: every expert starts as a copy of the dense FFN, its output times `scale`
    (w_out and b_out scaled: the expert's output is linear in them)."""
    ex = layer.experts
    w_out, b_out = dense.w_out, dense.b_out
    if scale != 1.0:  # 1 copies the dense weights untouched, bit for bit
        w_out, b_out = w_out * scale, (None if b_out is None else b_out * scale)
    pairs = [(dense.w_in, dense.b_in, ex.w_in, ex.b_in), (dense.w_gate, dense.b_gate, ex.w_gate, ex.b_gate),
             (w_out, b_out, ex.w_out, ex.b_out)]
    for source_w, source_b, weight, bias in pairs:
        if source_w is None:
            continue
        weight.copy_(source_w.unsqueeze(0).expand_as(weight))
        if bias is not None:
            bias.copy_(source_b.unsqueeze(0).expand_as(bias))
        if noise > 0 and not weight.is_meta:
            # Relative noise breaks expert symmetry; off by default so kept tokens are exact. Drawn
            # and scaled on the CPU, so the same seed gives the same experts on every device.
            std = noise * source_w.detach().cpu().abs().mean()
            weight.add_((torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * std).to(weight.device))
