"""Expert and router initialisation of a fresh SwitchFFN from its dense FFN: upcycling or the paper's random init."""
from __future__ import annotations

import torch

from moeify.config import MoEConfig
from moeify.conversion.dense_weights import DenseFFN
from moeify.layers import SwitchFFN


def initialise(layer: SwitchFFN, dense: DenseFFN, config: MoEConfig, generator: torch.Generator) -> None:
    """Router: the paper's truncated normal; experts: per config.init, from `dense` or at random."""
    layer.router.reset_parameters(config.init_scale, generator)
    if config.init == "random":
        layer.experts.reset_parameters(config.init_scale, generator)
    else:
        upcycle(layer, dense, config.upcycle_noise, generator)


@torch.no_grad()
def upcycle(layer: SwitchFFN, dense: DenseFFN, noise: float, generator: torch.Generator) -> None:
    """Sparse upcycling: every expert starts as a copy of the dense FFN."""
    ex = layer.experts
    pairs = [(dense.w_in, dense.b_in, ex.w_in, ex.b_in), (dense.w_gate, dense.b_gate, ex.w_gate, ex.b_gate),
             (dense.w_out, dense.b_out, ex.w_out, ex.b_out)]
    for source_w, source_b, weight, bias in pairs:
        if source_w is None:
            continue
        weight.copy_(source_w.unsqueeze(0).expand_as(weight))
        if bias is not None:
            bias.copy_(source_b.unsqueeze(0).expand_as(bias))
        if noise > 0 and not weight.is_meta:
            # Relative noise breaks expert symmetry; off by default so kept tokens are exact. Drawn
            # and scaled on the CPU, so the same seed gives the same experts on every device.
            scale = noise * source_w.detach().cpu().abs().mean()
            weight.add_((torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * scale).to(weight.device))
