"""Router auxiliary losses: load balancing (Switch) and z-loss (ST-MoE)."""
from __future__ import annotations

import torch

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
