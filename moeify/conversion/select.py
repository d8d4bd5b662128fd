"""select: choose which FFN sites become Switch layers (every/offset per stack, or a regex)."""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from moeify.config import MoEConfig
from moeify.conversion.find_ffn import FFNSearch, FFNSite
from moeify.errors import NoMatchError, opt


@dataclass
class Selection:
    """The sites to convert and the matched sites left dense, both in module order."""

    chosen: list[FFNSite]
    skipped: list[FFNSite]


def stack_key(name: str) -> tuple[str, int]:
    """('encoder.block', 3) for 'encoder.block.3.layer.1.DenseReluDense': the first list index."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i]), int(part)
    return name, 0


def stacks_of(sites: list[FFNSite]) -> dict[str, list[FFNSite]]:
    """Sites grouped by stack (encoder and decoder apart), each stack in layer order."""
    stacks: dict[str, list[tuple[int, FFNSite]]] = defaultdict(list)
    for s in sites:
        stack, index = stack_key(s.region)
        stacks[stack].append((index, s))
    return {k: [s for _, s in sorted(v, key=lambda t: t[0])] for k, v in stacks.items()}


def select_sites(sites: list[FFNSite], every: int, offset: int, layers: str | None) -> list[FFNSite]:
    """Sites to convert, in module order. A regex (re.search on the dense module name, the region)
    overrides every/offset; otherwise FFNs offset, offset + every, ... of each stack, counted from 0."""
    if layers is not None:
        pattern = re.compile(layers)
        return [s for s in sites if pattern.search(s.region)]
    stacks = stacks_of(sites)
    for stack, members in stacks.items():
        if offset >= len(members):
            raise NoMatchError(f"{opt('offset', offset)} is past the last FFN of {stack or 'the model'} "
                               f"({len(members)} FFN{'s' * (len(members) != 1)}, indices 0..{len(members) - 1}): "
                               f"use an offset below {len(members)}")
    chosen = {id(s) for members in stacks.values() for s in members[offset::every]}
    return [s for s in sites if id(s) in chosen]


def select(search: FFNSearch, config: MoEConfig, model_name: str, candidates: int) -> Selection:
    """Apply the config's selection to what find_ffns saw; no FFN, or none selected, is an error."""
    sites = search.sites
    if not sites:
        raise NoMatchError(_no_ffn_message(model_name, candidates, search.rejected))
    chosen = select_sites(sites, config.every, config.first, config.layers)
    if not chosen:  # only a regex can choose nothing: a valid offset picks one FFN per stack at least
        names = ", ".join(s.region for s in sites[:4]) + (", ..." if len(sites) > 4 else "")
        raise NoMatchError(f"{opt('layers', config.layers)} selects none of the {len(sites)} FFN sites "
                           f"({names}): fix the pattern")
    kept = {id(s) for s in chosen}
    return Selection(chosen, [s for s in sites if id(s) not in kept])


def _no_ffn_message(model: str, candidates: int, rejected: dict[str, str]) -> str:
    if not candidates:
        return (f"no dense FFN found in {model}: no module has two Linear children; "
                "moeify converts Linear -> activation -> Linear MLPs (pass a model that has one)")
    # Regions that traced but did not match are closer to an FFN than those that did not trace.
    ranked = sorted(rejected.items(), key=lambda kv: "could not be traced" in kv[1])
    closest = "; ".join(f"{name or '<root>'}: {why}" for name, why in ranked[:3])
    return (f"no dense FFN found in {model}: no module computes Linear -> activation -> Linear in its "
            f"own forward ({candidates} candidates; closest: {closest})")
