"""Router auxiliary losses: load balancing (Switch) and z-loss (ST-MoE)."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moeify.layers.dispatch import assignments_per_expert


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor,
                        fractions: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_i f_i * P_i (paper, eq. 4): f_i = (token, choice) assignments to expert i per token,
    P_i = mean router probability. `expert_index` is (T, k); with k = 1, f_i is the fraction of
    tokens whose argmax is i. For k > 1 this equals transformers' Mixtral load_balancing_loss_func
    on the same logits (balanced routing gives k, not 1), so Mixtral's coefficients carry over.
    `fractions`: f of a larger batch this one is an equal share of (a distributed step's global batch),
    without gradient as f has none: the mean of the shares' losses is then that batch's loss."""
    num_tokens, num_experts = probs.shape
    if fractions is not None:
        f = fractions.to(probs.dtype)
    else:
        f = assignments_per_expert(expert_index.reshape(-1), num_experts).to(probs.dtype) / num_tokens  # (E,)
    p = probs.mean(dim=0)  # (E,)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition: keeps router logits small, which keeps fp32 routing stable."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class _RouterLosses(torch.autograd.Function):
    """Both losses of one layer, and their weighted sum, as one node with its gradient written out. Composed of torch
    ops they take ~20 ops forward and ~23 backward per layer (logsumexp's and mean's pieces, three nodes for the sum),
    and on a GPU a small model's training step is bound by the host's cost per op (docs/performance.md)."""

    @staticmethod
    def forward(ctx, logits, probs, f, aux_coef: float, z_coef: float):
        num_tokens, num_experts = probs.shape
        ctx.set_materialize_grads(False)  # a loss nobody used hands back None, not a zero tensor to multiply
        lse = torch.logsumexp(logits, dim=-1)  # (T,)
        half_dz = lse * (1.0 / num_tokens)  # (T,) half of d z / d lse; d lse / d logits = softmax(logits) = probs
        da = f * (num_experts / num_tokens)  # (E,) d aux / d probs[t, :], the same for every t
        z = torch.dot(half_dz, lse)  # mean of lse^2
        aux = torch.dot(da, probs.sum(0))  # E * sum_i f_i * mean_t probs[t, i]
        ctx.save_for_backward(probs, half_dz, da)
        ctx.coefs = aux_coef, z_coef
        return aux, z, torch.add(z * z_coef, aux, alpha=aux_coef)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_aux, g_z, g_total):
        probs, half_dz, da = ctx.saved_tensors
        aux_coef, z_coef = ctx.coefs
        # Each loss's gradient, through its own output and through the weighted sum (usually only that one).
        g_aux = _plus(g_aux, g_total, aux_coef)
        g_z2 = _plus(g_z, g_total, z_coef, 2.0)  # twice z's: half_dz is half its derivative
        grad_logits = grad_probs = None
        if g_z2 is not None and ctx.needs_input_grad[0]:
            grad_logits = probs * (half_dz * g_z2).unsqueeze(1)
        if g_aux is not None and ctx.needs_input_grad[1]:
            grad_probs = (da * g_aux).expand_as(probs)
        return grad_logits, grad_probs, None, None, None


def _plus(grad: torch.Tensor | None, g_total: torch.Tensor | None, coef: float, times: float = 1.0
          ) -> torch.Tensor | None:
    """times * (grad + coef * g_total), where either may be missing (None: that output was not used)."""
    if g_total is None or coef == 0:
        return None if grad is None else grad * times
    scaled = g_total * (coef * times)
    return scaled if grad is None else torch.add(scaled, grad, alpha=times)


def fused_router_losses(logits: torch.Tensor, probs: torch.Tensor, fractions: torch.Tensor, aux_coef: float,
                        z_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(load_balancing_loss, router_z_loss, aux_coef * the first + z_coef * the second) of one router's output, with
    the values and gradients of the two functions above in about half the ops. `probs` must be softmax(logits) (the
    router's), `fractions` the f of the load-balancing loss, (E,) without gradient."""
    return _RouterLosses.apply(logits, probs, fractions.to(probs.dtype), float(aux_coef), float(z_coef))
