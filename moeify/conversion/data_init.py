"""After switchify: routers from calibration hidden states (--router-init hidden) and the InitReport of each layer."""
from __future__ import annotations

import math

import torch
from torch import nn

from moeify.config import MoEConfig
from moeify.conversion.find_ffn import FFNSite
from moeify.conversion.moefy import routed_error
from moeify.conversion.report import InitReport
from moeify.conversion.router_init import expert_loads, hidden_router, load_cv
from moeify.conversion.samples import SiteSamples
from moeify.layers.router import truncated_normal_


@torch.no_grad()
def initialise_from_data(model: nn.Module, sites: list[FFNSite], samples: dict[str, SiteSamples],
                         config: MoEConfig) -> dict[str, InitReport]:
    """Set the routers that start from data and measure every converted layer on its samples.

    Runs after switchify, so the experts are initialised exactly as without calibration (the
    same generator stream) and only the routers change; the SwitchFFN of a site is at its name.
    """
    generator = torch.Generator().manual_seed(config.seed)  # k-means seeding, separate from switchify's
    reports = {}
    for site in sites:
        s = samples[site.name]
        layer = model.get_submodule(site.name)
        router = layer.router
        if config.router_init == "hidden":
            random_weight = router.weight.clone()  # what --router-init random gave this layer
            weight = hidden_router(s.x, layer.num_experts, generator, site.name)
            router.weight.copy_(weight.to(router.weight.dtype))
        else:  # moefy's centroid router, against a paper-style random one drawn here
            random_weight = torch.empty_like(router.weight, device="cpu")
            truncated_normal_(random_weight, math.sqrt(config.init_scale / random_weight.shape[1]), generator)
        errors = ({f"top{k}_error": routed_error(layer, s.x, s.y, k) for k in (1, 2) if k <= layer.num_experts}
                  if config.init == "moefy" else {})
        reports[site.name] = InitReport(
            tokens=s.x.shape[0], load_cv=load_cv(expert_loads(router.weight, s.x, layer.top_k)),
            random_load_cv=load_cv(expert_loads(random_weight, s.x, layer.top_k)), **errors)
    return reports
