"""switchify: each selected FFNSite's nodes => one call_module(SwitchFFN), initialised from the FFN."""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn

from moeify.config import MoEConfig
from moeify.conversion.dense_weights import dense_ffn
from moeify.conversion.find_ffn import FFNSite
from moeify.conversion.init import initialise
from moeify.conversion.moefy import expert_d_ff
from moeify.conversion.regions import Region, linear_view
from moeify.layers import SwitchFFN

ORIGIN_KEY = "moeify.origin"


def build_switch(site: FFNSite, modules: dict[str, nn.Module], config: MoEConfig,
                 generator: torch.Generator | None) -> SwitchFFN:
    """A SwitchFFN shaped like `site` (moefy: experts d_ff / E wide); initialised per config.init, or left
    empty when generator is None."""
    w_in = linear_view(modules[site.w_in])
    # Built on meta, then given memory: a layer built elsewhere initialises itself, which would be a second,
    # wasted init of every expert here (and of a whole model's worth when its weights are loaded next).
    layer = SwitchFFN(
        site.d_model, expert_d_ff(site.name, site.d_ff, config), config.routing, site.activation, gated=site.gated,
        bias=site.bias, out_bias=site.out_bias,
        dropout=site.dropout if config.expert_dropout is None else config.expert_dropout,
        dtype=w_in.weight.dtype, device="meta").to_empty(device=w_in.weight.device)
    if generator is not None:
        initialise(layer, dense_ffn(site, modules), config, generator)
    return layer


def _rewrite(gm: fx.GraphModule, site: FFNSite, layer: SwitchFFN) -> None:
    """Replace the site's nodes with one call to `layer`, installed as a submodule of gm."""
    target = site.name[len(site.region) + 1:] if site.region else site.name
    gm.add_submodule(target, layer)
    by_name = {n.name: n for n in gm.graph.nodes}
    matched = [by_name[n] for n in site.nodes]  # in graph order: the output Linear last
    out, x = matched[-1], matched[0].args[0]  # x: the first projection's input
    with gm.graph.inserting_before(out):
        call = gm.graph.call_module(target, (x,))
    call.meta[ORIGIN_KEY] = {"pass": "switchify", "site": site.name, "replaced": list(site.nodes)}
    out.replace_all_uses_with(call)
    for node in reversed(matched):  # users before producers
        gm.graph.erase_node(node)
    for name in dict.fromkeys(n.target for n in matched if n.op == "call_module"):
        _delete_if_unused(gm, name)
    gm.graph.lint()  # a malformed rewrite fails here, naming the graph, not later in forward
    gm.recompile()


def _delete_if_unused(gm: fx.GraphModule, name: str) -> None:
    """Drop the replaced module `name`, then the containers it leaves empty (BertLayer's `intermediate`).

    Only what the site replaced: modules the graph reaches through get_attr (an attention called with
    the forward's **kwargs) keep their submodules although no call_module names them.
    """
    def referenced(name: str) -> bool:
        return any(isinstance(n.target, str) and (n.target == name or n.target.startswith(name + "."))
                   for n in gm.graph.nodes if n.op in ("call_module", "get_attr"))

    def empty(m: nn.Module) -> bool:
        return all(next(it, None) is None for it in (m.children(), m.parameters(), m.buffers()))

    if referenced(name):
        return
    gm.delete_submodule(name)
    parent = name.rpartition(".")[0]
    while parent and not referenced(parent) and empty(gm.get_submodule(parent)):
        gm.delete_submodule(parent)
        parent = parent.rpartition(".")[0]


def switchify(model: nn.Module, regions: list[Region], sites: list[FFNSite], config: MoEConfig, *,
              init: bool = True, progress: Callable[[str, int, int], None] | None = None) -> nn.Module:
    """Rewrite each site into a SwitchFFN inside `model` (in place); returns the model, which is a
    new object only when the whole model was one FFN. Without `init` the experts stay uninitialised
    (the structure for loading saved weights)."""
    # One CPU generator whatever the device: the same seed gives the same weights on cpu and cuda.
    generator = torch.Generator().manual_seed(config.seed) if init else None
    by_region = {r.name: r for r in regions}
    for done, site in enumerate(sites):
        gm = by_region[site.region].graph_module
        layer = build_switch(site, dict(gm.named_modules()), config, generator)
        if site.whole_region:
            # The region is exactly the FFN: the SwitchFFN takes its place and its name.
            model = _install(model, site.name, layer)
        else:
            _rewrite(gm, site, layer)
            model = _install(model, site.region, gm)
        if progress:
            progress("switchify", done + 1, len(sites))
    return model


def _install(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at `name` in `model`; returns the model, which is `module` for the root."""
    if not name:
        return module
    model.set_submodule(name, module)
    return model
