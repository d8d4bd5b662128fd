"""select: choose which FFN sites become Switch layers (every/offset per stack, or a regex)."""
from __future__ import annotations

import re
from collections import defaultdict

from moeify.conversion.find_ffn import FFNSite, sites_of
from moeify.conversion.passes import Pass, PassContext, PassResult, Program
from moeify.errors import NoMatchError

META_KEY = "moeify.select"


def stack_key(name: str) -> tuple[str, int]:
    """('encoder.block', 3) for 'encoder.block.3.layer.1.DenseReluDense': the first list index."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return name, 0


def select_sites(sites: list[FFNSite], every: int, offset: int, layers: str | None) -> list[FFNSite]:
    """Sites to convert. A regex (re.search on the site name) overrides every/offset."""
    if layers is not None:
        pattern = re.compile(layers)
        return [s for s in sites if pattern.search(s.name)]
    stacks: dict[str, list[tuple[int, FFNSite]]] = defaultdict(list)
    for s in sites:
        stack, index = stack_key(s.name)
        stacks[stack].append((index, s))
    chosen = set()
    for members in stacks.values():
        # Count sites within each stack (encoder and decoder separately), in layer order.
        for ordinal, (_, s) in enumerate(sorted(members, key=lambda t: t[0])):
            if ordinal % every == offset % every:
                chosen.add(id(s))
    return [s for s in sites if id(s) in chosen]


class SelectSites(Pass):
    """Analysis only: marks chosen sites with node.meta[META_KEY] = True."""

    name = "select"
    matches = "FFNSite records left by find_ffn"
    preserves_computation = True

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        sites = sites_of(program)
        if not sites:
            raise NoMatchError(_no_ffn_message(program, ctx.notes.get("rejected", {})))
        c = ctx.config
        chosen = select_sites(sites, c.every, c.offset, c.layers)
        if not chosen:
            names = ", ".join(s.name for s in sites[:4]) + (", ..." if len(sites) > 4 else "")
            if c.layers is not None:
                raise NoMatchError(f"--layers {c.layers!r} selects none of the {len(sites)} FFN sites "
                                   f"({names}): fix the pattern")
            raise NoMatchError(f"--every {c.every} --offset {c.offset} selects none of the {len(sites)} "
                               f"FFN sites ({names}): use --every 1 to convert them all")
        chosen_ids = {id(s) for s in chosen}
        for region in program.regions:
            if region.graph_module is None:
                continue
            for node in region.graph_module.graph.nodes:
                site = node.meta.get("moeify.ffn")
                if site is not None:
                    node.meta[META_KEY] = id(site) in chosen_ids
        ctx.notes["skipped"] = [s.name for s in sites if id(s) not in chosen_ids]
        return PassResult(program, modified=False)


def _no_ffn_message(program: Program, rejected: dict[str, str]) -> str:
    model = type(program.model).__name__
    if not program.regions:
        return (f"no dense FFN found in {model}: no module has two Linear children; "
                "moeify converts Linear -> activation -> Linear MLPs (pass a model that has one)")
    # Regions that traced but did not match are closer to an FFN than those that did not trace.
    ranked = sorted(rejected.items(), key=lambda kv: "could not be traced" in kv[1])
    closest = "; ".join(f"{name or '<root>'}: {why}" for name, why in ranked[:3])
    return (f"no dense FFN found in {model}: no module computes Linear -> activation -> Linear in its "
            f"own forward ({len(program.regions)} candidates; closest: {closest})")
