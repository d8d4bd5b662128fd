"""router_losses(model): an explicit collector of router losses and routing statistics."""
from __future__ import annotations

import contextlib
import functools
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.layers.dispatch import assignments_per_expert
from moeify.layers.losses import fused_router_losses
from moeify.layers.profiling import traced


@dataclass
class LayerRouting:
    """What one SwitchFFN's router did in one forward call."""

    name: str
    aux_loss: torch.Tensor  # unscaled load-balancing loss (differentiable)
    z_loss: torch.Tensor  # unscaled router z-loss (differentiable)
    aux_loss_coef: float
    z_loss_coef: float
    loss: torch.Tensor  # aux_loss_coef * aux_loss + z_loss_coef * z_loss (differentiable)
    tokens_per_expert: torch.Tensor  # (E,) assignments (token, choice) to each expert, before capacity
    capacity: int | None  # slots per expert; None when dropless

    @property
    def dropped_count(self) -> torch.Tensor:
        """Assignments over capacity (they add nothing to their token's output), on the device: computed when
        asked, not in the forward (each op there is a kernel launch on CUDA), and reading `dropped` waits for it."""
        if self.capacity is None:
            return self.tokens_per_expert.new_zeros(())
        return (self.tokens_per_expert - self.tokens_per_expert.clamp(max=self.capacity)).sum()

    @property
    def dropped(self) -> int:
        return int(self.dropped_count)

    @property
    def tokens(self) -> int:
        """Assignments routed: tokens x top_k."""
        return int(self.tokens_per_expert.sum())


@dataclass
class RouterLosses:
    """Router losses and statistics gathered by `router_losses(model)`."""

    layers: list[LayerRouting] = field(default_factory=list)

    def total(self) -> torch.Tensor:
        """Sum over layers of aux_loss_coef * load balancing + z_loss_coef * z-loss."""
        # Added in Python: a stack and a sum would cost a select per layer in the backward.
        return functools.reduce(operator.add, [r.loss for r in self.layers]) if self.layers else torch.zeros(())

    def aux_loss(self) -> torch.Tensor:
        return torch.stack([r.aux_loss for r in self.layers]).sum() if self.layers else torch.zeros(())

    def z_loss(self) -> torch.Tensor:
        return torch.stack([r.z_loss for r in self.layers]).sum() if self.layers else torch.zeros(())

    def dropped_fraction(self) -> float:
        """Dropped assignments over all assignments (with top-1: dropped tokens over tokens)."""
        tokens = sum(r.tokens for r in self.layers)
        return sum(r.dropped for r in self.layers) / tokens if tokens else 0.0

    def clear(self) -> None:
        self.layers.clear()


@contextlib.contextmanager
def router_losses(model: nn.Module, fractions: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                  ) -> Iterator[RouterLosses]:
    """Collect every Switch layer's router losses during forward calls inside the block.

    Forward passes return plain outputs; this explicit collector observes the routers
    through forward hooks, so no loss is ever stashed on a module. `fractions(routed, tokens)`,
    if given, turns a layer's assignments per expert and its token count into the f of its
    load-balancing loss (a distributed step: the global batch's, summed over ranks).
    """
    from moeify.layers.switch import SwitchFFN, switch_layers

    layers = list(switch_layers(model).items())
    if not layers:
        raise MoeifyError("the model has no SwitchFFN layers: convert it first with moeify.convert")
    collected = RouterLosses()

    def make_hook(name: str, layer: SwitchFFN):
        @traced("moeify::router_losses")
        def hook(_router, _inputs, out) -> None:
            routed = assignments_per_expert(out.expert_index.detach().reshape(-1), layer.num_experts)
            tokens = out.expert_index.shape[0]
            r = layer.routing
            # f from the counts just made, not counted again inside the loss
            f = routed / tokens if fractions is None else fractions(routed, tokens)
            aux, z, loss = fused_router_losses(out.logits, out.probs, f, r.aux_loss_coef, r.z_loss_coef)
            collected.layers.append(LayerRouting(
                name=name, aux_loss=aux, z_loss=z, aux_loss_coef=r.aux_loss_coef, z_loss_coef=r.z_loss_coef, loss=loss,
                tokens_per_expert=routed,
                capacity=layer.capacity(tokens),
            ))
        return hook

    handles = [m.router.register_forward_hook(make_hook(n, m)) for n, m in layers]
    try:
        yield collected
    finally:
        for h in handles:
            h.remove()
