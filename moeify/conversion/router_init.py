"""--router-init hidden: router rows from k-means centroids of each site's inputs; expert-load balance of a router."""
from __future__ import annotations

import torch

from moeify.conversion.kmeans import spherical_kmeans
from moeify.errors import MoeifyError, opt


def hidden_router(x: torch.Tensor, num_experts: int, generator: torch.Generator, site: str) -> torch.Tensor:
    """(E, d_model) unit rows: the spherical k-means centroids of the site's inputs x (N, d_model).
    Top-1 routing then sends each calibration token to its own cluster."""
    if x.shape[0] < num_experts:
        raise MoeifyError(f"{site} saw {x.shape[0]} calibration tokens, fewer than its {num_experts} experts: "
                          f"give more text with {opt('text')}")
    centroids, _ = spherical_kmeans(x, num_experts, generator)
    return centroids


def expert_loads(weight: torch.Tensor, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Assignments per expert (E,) when a router with `weight` sends each row of x to its top_k
    experts (softmax is monotonic: the largest logits are the most probable experts)."""
    logits = torch.nn.functional.linear(x.to(weight.device, weight.dtype), weight)
    index = logits.max(-1).indices if top_k == 1 else logits.topk(top_k, dim=-1).indices.reshape(-1)
    return torch.bincount(index, minlength=weight.shape[0])


def load_cv(loads: torch.Tensor) -> float:
    """Coefficient of variation of the loads, std / mean (population std): 0 is perfectly balanced,
    sqrt(E - 1) is every token on one expert."""
    loads = loads.double()
    return float(loads.std(correction=0) / loads.mean())
