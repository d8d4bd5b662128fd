"""Pass infrastructure: a Program of traced regions flows through ordered passes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from moeify.config import MoEConfig
from moeify.conversion.regions import Region
from moeify.errors import MoeifyError


@dataclass
class Program:
    """What flows between passes: the model being rewritten and its traced regions.

    torch.fx's PassBase works on one GraphModule; a conversion touches many regions of one
    model at once (selection counts sites across a whole stack), so the unit here is a Program.
    """

    model: nn.Module
    regions: list[Region]


@dataclass
class PassContext:
    config: MoEConfig
    generator: torch.Generator
    skip_init: bool = False  # rebuild structure only; weights are loaded afterwards
    progress: Callable[[str, int, int], None] | None = None  # (what, done, total)
    notes: dict = field(default_factory=dict)  # passes report facts for the conversion record


@dataclass
class PassResult:
    program: Program
    modified: bool


class Pass:
    """A step of the pipeline. Subclasses state what they match and whether they keep the function."""

    name: ClassVar[str]
    matches: ClassVar[str]  # one line: what the pass looks for
    preserves_computation: ClassVar[bool]  # True if outputs are unchanged (up to float rounding)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError


class PassManager:
    """Runs passes in order, lints every traced graph after each, and names what ran on failure."""

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = passes

    def __call__(self, program: Program, ctx: PassContext) -> Program:
        ran: list[str] = []
        for p in self.passes:
            try:
                program = p(program, ctx).program
                for region in program.regions:
                    if region.graph_module is not None:
                        region.graph_module.graph.lint()
            except MoeifyError:
                raise
            except Exception as e:
                raise RuntimeError(f"pass {p.name!r} failed after {ran or 'no passes'}: {e}") from e
            ran.append(p.name)
        return program
