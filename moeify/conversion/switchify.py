"""switchify: each selected FFNSite's nodes => one call_module(SwitchFFN), initialised from the FFN."""
from __future__ import annotations

import torch
from torch import fx, nn

from moeify.config import RoutingConfig
from moeify.conversion.find_ffn import META_KEY as FFN_KEY
from moeify.conversion.find_ffn import FFNSite
from moeify.conversion.passes import Pass, PassContext, PassResult, Program
from moeify.conversion.regions import linear_view
from moeify.conversion.select import META_KEY as SELECT_KEY
from moeify.layers import SwitchFFN

ORIGIN_KEY = "moeify.origin"


def build_switch(site: FFNSite, modules: dict[str, nn.Module], ctx: PassContext) -> SwitchFFN:
    """A SwitchFFN shaped like `site`, initialised per ctx.config.init."""
    c = ctx.config
    w_in = linear_view(modules[site.w_in])
    layer = SwitchFFN(
        site.d_model, site.d_ff, RoutingConfig.from_moe(c), site.activation, gated=site.gated,
        bias=site.bias, out_bias=site.out_bias,
        dropout=site.dropout if c.expert_dropout is None else c.expert_dropout,
        dtype=w_in.weight.dtype, device=w_in.weight.device)
    if ctx.skip_init:
        return layer
    layer.router.reset_parameters(c.init_scale, ctx.generator)
    if c.init == "random":
        layer.experts.reset_parameters(c.init_scale, ctx.generator)
    else:
        _upcycle(layer, site, modules, c.upcycle_noise, ctx.generator)
    return layer


@torch.no_grad()
def _upcycle(layer: SwitchFFN, site: FFNSite, modules: dict[str, nn.Module], noise: float,
             generator: torch.Generator) -> None:
    """Sparse upcycling: every expert starts as a copy of the dense FFN."""
    ex = layer.experts
    pairs = [(site.w_in, ex.w_in, ex.b_in), (site.w_gate, ex.w_gate, ex.b_gate), (site.w_out, ex.w_out, ex.b_out)]
    for target, weight, bias in pairs:
        if target is None:
            continue
        view = linear_view(modules[target])
        weight.copy_(view.weight.unsqueeze(0).expand_as(weight))
        if bias is not None:
            bias.copy_(view.bias.unsqueeze(0).expand_as(bias))
        if noise > 0 and not weight.is_meta:
            # Relative noise breaks expert symmetry; off by default so kept tokens are exact.
            scale = view.weight.abs().mean()
            weight.add_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * noise * scale)


def _rewrite(gm: fx.GraphModule, site: FFNSite, out: fx.Node, layer: SwitchFFN) -> None:
    """Replace the site's nodes with one call to `layer`, installed as a submodule of gm."""
    target = site.name[len(site.region) + 1:] if site.region else site.name
    gm.add_submodule(target, layer)
    by_name = {n.name: n for n in gm.graph.nodes}
    matched = [by_name[n] for n in site.nodes]  # in graph order
    x = matched[0].args[0]  # the first projection's input
    with gm.graph.inserting_before(out):
        call = gm.graph.call_module(target, (x,))
    call.meta[ORIGIN_KEY] = {"pass": "switchify", "site": site.name, "replaced": list(site.nodes)}
    out.replace_all_uses_with(call)
    for node in reversed(matched):  # users before producers
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.recompile()


class Switchify(Pass):
    """Rewrite: selected FFN subgraphs become SwitchFFN calls.

    Preserves computation only for num_experts=1 with capacity for every token (gate = 1):
    the test suite checks exactly that.
    """

    name = "switchify"
    matches = "output Linears whose node.meta carries a selected FFNSite"
    preserves_computation = False

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        jobs = [(r, n) for r in program.regions if r.graph_module is not None
                for n in list(r.graph_module.graph.nodes) if n.meta.get(SELECT_KEY)]
        converted = []
        for done, (region, out) in enumerate(jobs):
            gm, site = region.graph_module, out.meta[FFN_KEY]
            layer = build_switch(site, dict(gm.named_modules()), ctx)
            if site.whole_region:
                # The region is exactly the FFN: the SwitchFFN takes its place and its name.
                program.model = _install(program.model, site.name, layer)
            else:
                _rewrite(gm, site, out, layer)
                program.model = _install(program.model, region.name, gm)
            converted.append(site)
            if ctx.progress:
                ctx.progress("switchify", done + 1, len(jobs))
        ctx.notes["converted"] = converted
        return PassResult(program, modified=bool(converted))


def _install(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at `name` in `model`; returns the model, which is `module` for the root."""
    if not name:
        return module
    model.set_submodule(name, module)
    return model
