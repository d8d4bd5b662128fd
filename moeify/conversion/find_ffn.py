"""find_ffn: Linear -> act -> [Dropout] -> Linear, gated (by two Linears or one split in halves) => FFNSites."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from moeify.conversion.activations import activation_of, dropout_rate
from moeify.conversion.regions import LinearView, Region, linear_view

MUL_TARGETS = {operator.mul, torch.mul}


@dataclass
class FFNSite:
    """A matched dense FFN inside a region, in the terms a SwitchFFN needs."""

    name: str  # qualified name the SwitchFFN takes in the model
    region: str  # qualified name of the traced region: the dense module users see and select by
    w_in: str  # region-relative module targets of the linears
    w_gate: str | None  # the linear feeding the activation in a gated FFN
    w_out: str
    d_model: int
    d_ff: int
    bias: bool  # input projections carry biases
    out_bias: bool
    dropout: float
    activation: nn.Module
    nodes: tuple[str, ...]  # matched node names, in graph order (the output Linear last)
    whole_region: bool  # the region computes exactly this FFN
    # One Linear computes gate and input (w_gate == w_in, Phi-3's gate_up_proj): which half of its
    # outputs is the gate and which the input, as (gate, input); None for two Linears.
    halves: tuple[int, int] | None = None

    @property
    def gated(self) -> bool:
        return self.w_gate is not None


class NoMatch(Exception):
    """Why a candidate Linear did not end an FFN (shown to users when nothing matches)."""


def _linear(node: fx.Node, modules: dict[str, nn.Module]) -> LinearView | None:
    if node.op == "call_module":
        return linear_view(modules[node.target])
    return None


CHUNK_TARGETS = {torch.chunk, "chunk"}


def _half(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(the chunk call, i) when `node` is half i of x.chunk(2, dim=-1) or torch.chunk(x, 2, -1)."""
    if not (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2):
        return None
    chunk, i = node.args
    if not (isinstance(chunk, fx.Node) and chunk.op in ("call_method", "call_function")
            and chunk.target in CHUNK_TARGETS and i in (0, 1)):
        return None
    args = list(chunk.args) + [chunk.kwargs[k] for k in ("chunks", "dim") if k in chunk.kwargs]
    return (chunk, i) if args[1:] == [2, -1] else None


def _fused_halves(up: fx.Node, gate: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, fx.Node, int, int]:
    """(chunk, linear, gate half, input half) for `act(h[g]) * h[i]` with h = linear(x).chunk(2, -1)."""
    hu, hg = _half(up), _half(gate)
    if hu is None or hg is None:
        raise NoMatch(f"{up.name}: the other factor of the gate is not a Linear, nor half of one "
                      "(x.chunk(2, dim=-1))")
    if hu[0] is not hg[0] or hu[1] == hg[1]:
        raise NoMatch(f"{up.name} and {gate.name} are not the two halves of one chunk")
    chunk = hu[0]
    linear = chunk.args[0]
    if not (isinstance(linear, fx.Node) and _linear(linear, modules)):
        raise NoMatch(f"{chunk.name} splits a value that is not a Linear's output")
    return chunk, linear, hg[1], hu[1]


def _match_at(out: fx.Node, modules: dict[str, nn.Module]) -> dict:
    """Match an FFN ending at the linear call `out`; raise NoMatch with the reason otherwise."""
    view_out = _linear(out, modules)
    assert view_out is not None
    nodes = [out]
    h = out.args[0]
    p = 0.0
    if isinstance(h, fx.Node) and (rate := dropout_rate(h, modules)) is not None:
        nodes.append(h)
        p, h = rate, h.args[0]
    if not isinstance(h, fx.Node):
        raise NoMatch(f"input of {out.target!r} is not computed in the graph")
    gate, halves = None, None
    if h.op == "call_function" and h.target in MUL_TARGETS and len(h.args) == 2:
        a, b = h.args
        act_node = next((n for n in (a, b) if isinstance(n, fx.Node) and activation_of(n, modules)), None)
        if act_node is None:
            raise NoMatch(f"{h.name} multiplies but neither factor is an activation")
        lin_node = b if act_node is a else a
        if not isinstance(lin_node, fx.Node):
            raise NoMatch(f"{h.name}: the other factor of the gate is not computed in the graph")
        nodes += [h, act_node]
        gate = act_node.args[0]
        up = lin_node
        if not _linear(lin_node, modules) and isinstance(gate, fx.Node):
            chunk, linear, gate_half, in_half = _fused_halves(lin_node, gate, modules)
            nodes += [lin_node, gate, chunk]
            up = gate = linear
            halves = (gate_half, in_half)
    else:
        act_node = h
        if activation_of(act_node, modules) is None:
            what = (type(modules[act_node.target]).__name__ if act_node.op == "call_module"
                    else getattr(act_node.target, "__name__", act_node.target))  # tanh, not its repr
            raise NoMatch(f"{out.target!r} is fed by {act_node.op} {what}, not an activation")
        nodes.append(act_node)
        up = act_node.args[0]
    if not (isinstance(up, fx.Node) and _linear(up, modules)):
        raise NoMatch(f"activation {act_node.name} is not applied to a Linear")
    if gate is not None and not (isinstance(gate, fx.Node) and _linear(gate, modules)):
        raise NoMatch(f"gate activation {act_node.name} is not applied to a Linear")
    nodes.append(up)
    if gate is not None and gate is not up:
        nodes.append(gate)
        if gate.args[0] is not up.args[0]:
            raise NoMatch("the gate and input projections read different tensors")
    x = up.args[0]
    view_in = _linear(up, modules)
    d_model, d_ff = view_in.in_features, view_in.out_features
    if halves is not None:
        if d_ff % 2:
            raise NoMatch(f"{up.target!r} has {d_ff} outputs, which do not split into two halves")
        d_ff //= 2
    if (view_out.in_features, view_out.out_features) != (d_ff, d_model):
        raise NoMatch(f"{out.target!r} maps {view_out.in_features}->{view_out.out_features}, "
                      f"expected {d_ff}->{d_model} after {up.target!r} ({d_model}->{d_ff})")
    view_gate = _linear(gate, modules) if gate is not None and halves is None else None
    if view_gate is not None and (view_gate.in_features, view_gate.out_features) != (d_model, d_ff):
        raise NoMatch(f"gate {gate.target!r} is {view_gate.in_features}->{view_gate.out_features}, "
                      f"expected {d_model}->{d_ff}")
    if view_gate is not None and (view_gate.bias is None) != (view_in.bias is None):
        raise NoMatch("only one of the gate and input projections has a bias")
    inner = set(nodes) - {out}
    for n in inner:  # self-contained: nothing outside reads an intermediate value
        leaks = [u.name for u in n.users if u not in inner and u is not out]
        if leaks:
            raise NoMatch(f"{n.name} is also used by {leaks}, outside the FFN")
    return dict(x=x, nodes=nodes, up=up, gate=gate, act=act_node, d_model=d_model, d_ff=d_ff,
                bias=view_in.bias is not None, out_bias=view_out.bias is not None, dropout=p,
                activation=activation_of(act_node, modules), halves=halves)


def find_in_region(region: Region) -> tuple[list[FFNSite], list[str]]:
    """The region's FFN sites, and the reasons its other Linears did not end an FFN."""
    gm = region.graph_module
    assert gm is not None, "find_in_region needs a traced region"
    modules = dict(gm.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and _linear(n, modules)]
    # A linear called twice shares weights between calls: it cannot become per-token experts.
    targets = [n.target for n in calls]
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    found, reasons, consumed = [], {}, set()
    for out in calls:
        try:
            m = _match_at(out, modules)
            used = (m["up"], m["gate"], out)  # up and gate are one node for a fused gate-up projection
            shared = sorted({n.target for n in used if n is not None and targets.count(n.target) > 1})
            if shared:
                raise NoMatch(f"{shared} are called more than once")
        except NoMatch as e:
            reasons[out] = str(e)
            continue
        consumed.update(m["nodes"])
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        output = next(n for n in gm.graph.nodes if n.op == "output")
        whole = (set(body) == set(m["nodes"]) and output.args[0] is out
                 and placeholders[:1] == [m["x"]] and all(not p.users for p in placeholders[1:]))
        site = FFNSite(
            name=region.name if whole else _join(region.name, "moe"),
            region=region.name, w_in=m["up"].target,
            w_gate=m["gate"].target if m["gate"] is not None else None, w_out=out.target,
            d_model=m["d_model"], d_ff=m["d_ff"], bias=m["bias"], out_bias=m["out_bias"],
            dropout=m["dropout"], activation=m["activation"],
            nodes=tuple(n.name for n in sorted(m["nodes"], key=position.__getitem__)), whole_region=whole,
            halves=m["halves"])
        found.append(site)
    if len(found) > 1:  # several FFNs inside one region get distinct names
        for i, site in enumerate(found):
            site.name = _join(region.name, f"moe_{i}")
    return found, [why for n, why in reasons.items() if n not in consumed]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class FFNSearch:
    """What find_ffns saw: the matched sites in module order, and why other candidates are not FFNs."""

    sites: list[FFNSite] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # candidate module name -> reason


def find_ffns(regions: list[Region]) -> FFNSearch:
    """Every FFN site of the traced regions; a region that did not trace or match keeps its reason."""
    search = FFNSearch()
    for region in regions:
        if region.graph_module is None:
            search.rejected[region.name] = f"{region.type_name} could not be traced ({region.error})"
            continue
        found, reasons = find_in_region(region)
        search.sites += found
        if not found:
            search.rejected[region.name] = f"{region.type_name}: " + ("; ".join(reasons) or "no Linear call")
    return search
