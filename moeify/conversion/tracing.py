"""Tracing one module's own forward with torch.fx (submodules leaves or inlined) into a GraphModule of its class."""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
from torch import fx, nn

from moeify.errors import MoeifyError

# The one key a `**kwargs` parameter shows while traced: the calls it reaches get the whole dict, forwarded.
SPLAT = "__moeify_kwargs__"


def call_forwarding(module: nn.Module, args: tuple, kwargs: dict, forwarded: dict) -> Any:
    """module(*args, **kwargs, **forwarded): a call that passed on the forward's `**kwargs` (fx writes no `**`)."""
    return module(*args, **kwargs, **forwarded)


def require_given(value: Any, name: str, where: str) -> Any:
    """`value`, or an error when it is None: the traced forward took the branch where `name` is given."""
    if value is None:
        raise MoeifyError(f"{where} was converted for calls that pass {name}, and this call passes None "
                          f"(its forward branches on it): pass {name}, or leave this layer dense with --layers")
    return value


class RegionTracer(fx.Tracer):
    """Traces only a region's own forward: every submodule a call_module leaf, except the children named in
    `inline`, whose forward is traced in place (BertIntermediate and BertOutput inside BertLayer).

    What a whole layer's forward needs besides (BertLayer, BartDecoderLayer, OPTDecoderLayer):
    - decorators are looked through (transformers wraps forwards for gradient checkpointing and
      renamed arguments), so the graph's signature is the function's own;
    - `**kwargs` reach the module calls they reached, as one dict (see call_forwarding);
    - `self.training` is read when the graph runs: F.dropout(x, p, training=self.training) keeps
      following train() and eval() instead of the mode at conversion;
    - `x.dtype == torch.float16` on a computed value is decided by the region's parameter dtype
      (BART's and Whisper's float16 overflow clamps); other control flow on traced values fails.
    """

    def __init__(self, inline: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.inline = inline
        self.dtype: torch.dtype | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.inline

    def trace(self, root, concrete_args=None) -> fx.Graph:
        traced = [root, *(root.get_submodule(n) for n in self.inline)]
        modes = [m.training for m in traced]
        self.dtype = next((p.dtype for p in root.parameters() if p.is_floating_point()), None)
        try:
            graph = super().trace(root, concrete_args)
        finally:
            for m, mode in zip(traced, modes):
                m.training = mode
        _forward_kwargs(graph)
        return graph

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        fn, args = super().create_args_for_root(inspect.unwrap(root_fn), is_module, concrete_args)
        if is_module:
            training = self.create_proxy("get_attr", "training", (), {})
            for m in [self.root, *(self.root.get_submodule(n) for n in self.inline)]:
                m.training = training  # trace() puts the modes back
        return fn, args

    def keys(self, obj: fx.Proxy):
        node = obj.node
        if node.op == "placeholder" and str(node.target).startswith("**"):
            return [SPLAT]
        return super().keys(obj)

    def to_bool(self, obj: fx.Proxy) -> bool:
        node = obj.node
        if self.dtype is not None and node.op == "call_function" and node.target in (operator.eq, operator.ne):
            a, b = node.args
            if _is_activation_dtype(a) and isinstance(b, torch.dtype) and b.is_floating_point:
                return node.target(self.dtype, b)
        return super().to_bool(obj)


def _is_activation_dtype(n: Any) -> bool:
    """`x.dtype` of a value computed in the region: an input (a mask, ids) may have any dtype."""
    return (isinstance(n, fx.Node) and n.op == "call_function" and n.target is getattr and n.args[1:] == ("dtype",)
            and isinstance(n.args[0], fx.Node) and n.args[0].op != "placeholder")


def _forward_kwargs(graph: fx.Graph) -> None:
    """Module calls that received the forward's `**kwargs` call it through call_forwarding with the dict itself."""
    for node in list(graph.nodes):
        if SPLAT not in node.kwargs:
            continue
        if node.op != "call_module":
            raise fx.proxy.TraceError(f"{node.target} receives **kwargs, which moeify forwards to modules only")
        marker = node.kwargs[SPLAT]  # getitem(kwargs, SPLAT)
        kwargs = {k: v for k, v in node.kwargs.items() if k != SPLAT}
        with graph.inserting_before(node):
            module = graph.get_attr(node.target)
            call = graph.call_function(call_forwarding, (module, node.args, kwargs, marker.args[0]))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        if not marker.users:
            graph.erase_node(marker)


def trace_module(module: nn.Module, inline: frozenset[str] = frozenset(), where: str = "") -> fx.GraphModule:
    """`module`'s forward as a GraphModule of its class (graph_module), dead code removed; raises whatever
    fx raises when it does not trace. `where` names the module in require_given's errors."""
    graph = RegionTracer(inline).trace(module)
    for name in _branched_on(module, graph, inline):
        _require(graph, name, f"{where} ({type(module).__name__})")
    gm = graph_module(module, graph)
    gm.graph.eliminate_dead_code()  # e.g. unused parameter reads left by dtype checks
    gm.recompile()
    return gm


def _branched_on(module: nn.Module, graph: fx.Graph, inline: frozenset[str]) -> list[str]:
    """Optional parameters (default None) whose None takes another path through the forward.

    A traced placeholder is never None, so `if encoder_hidden_states is not None:` took its branch;
    tracing again with the parameter None shows whether the computation differs.
    """
    names = []
    for p in graph.nodes:
        if p.op != "placeholder" or p.args != (None,) or not p.users:
            continue
        try:
            other = RegionTracer(inline).trace(module, concrete_args={p.target: None})
        except Exception:  # the None path does not even trace: it certainly differs
            names.append(p.target)
            continue
        if _computation(graph, {p.target}) != _computation(other, {p.target, f"{p.target}_1"}):
            names.append(p.target)
    return names


def _computation(graph: fx.Graph, none: set[str]) -> list[tuple]:
    """The graph's nodes as (op, target, arguments) with nodes by position and the placeholders `none` as None."""
    index: dict[fx.Node, Any] = {}
    out = []
    for n in graph.nodes:
        if n.op == "placeholder":
            index[n] = None if n.target in none else f"<{n.target}>"
        elif not (n.op == "call_function" and n.target is fx._symbolic_trace._assert_is_none):
            index[n] = len(out)
            out.append((n.op, n.target, repr(fx.node.map_arg((n.args, n.kwargs), index.__getitem__))))
    return out


def _require(graph: fx.Graph, name: str, where: str) -> None:
    """Every use of placeholder `name` goes through require_given: None fails instead of taking the traced path."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    p = next(n for n in placeholders if n.target == name)
    with graph.inserting_after(placeholders[-1]):
        checked = graph.call_function(require_given, (p, name, where))
    p.replace_all_uses_with(checked, delete_user_cb=lambda user: user is not checked)


_MODULE_FIELDS = frozenset(vars(nn.Module()))  # what nn.Module.__init__ sets; the rest is the class's own state
_PRESERVED = "_user_preserved_attributes"  # fx's meta key for attributes deepcopy restores
_KEPT: dict[type, type] = {}


def graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule that is still an instance of `module`'s class and keeps its plain attributes.

    transformers finds layers by class (output_hidden_states hooks every BertLayer) and models read
    their layers' attributes (`layer.attention_type`); the forward is the graph's all the same.
    """
    cls = type(module)
    if cls not in _KEPT:  # the class first: its methods and attributes; GraphModule's where it has none
        _KEPT[cls] = type(cls.__name__, (cls, fx.GraphModule), {"__module__": cls.__module__})
    gm = fx.GraphModule.__new__(_KEPT[cls])
    fx.GraphModule.__init__(gm, module, graph, cls.__name__)  # not cls.__init__: that builds a dense layer
    plain = {k: v for k, v in vars(module).items() if k not in _MODULE_FIELDS and k not in vars(gm)}
    gm.__dict__.update(plain)
    gm.meta[_PRESERVED] = plain
    return gm
