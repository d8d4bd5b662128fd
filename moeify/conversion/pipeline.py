"""convert(): capture -> find_ffn -> select -> switchify, on a copy of the model.

Stages, in order (each a Pass in moeify/passes/):
  1. capture      trace each module with two Linear children (moeify/capture.py)
  2. find_ffn     annotate Linear -> act -> [Dropout] -> Linear and gated FFNs (analysis)
  3. select       every/offset per stack, or a regex over site names (analysis)
  4. switchify    replace each selected FFN with a SwitchFFN (rewrite, upcycled by default)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from moeify.config import MoEConfig
from moeify.conversion.find_ffn import FFNSite, FindFFN
from moeify.conversion.passes import Pass, PassContext, PassManager, Program
from moeify.conversion.regions import capture
from moeify.conversion.select import SelectSites
from moeify.conversion.switchify import Switchify


@dataclass
class SiteRecord:
    """A converted site, as saved in moeify.json and shown by `inspect`."""

    name: str
    d_model: int
    d_ff: int
    gated: bool
    bias: bool
    activation: str

    @classmethod
    def of(cls, site: FFNSite) -> "SiteRecord":
        return cls(site.name, site.d_model, site.d_ff, site.gated, site.bias, _describe(site.activation))


@dataclass
class ConversionRecord:
    """What a conversion did. Attached to the converted model as `model.moeify_record`."""

    config: MoEConfig
    sites: list[SiteRecord]
    skipped: list[str] = field(default_factory=list)  # matched FFNs that selection left dense
    rejected: dict[str, str] = field(default_factory=dict)  # candidate module -> why no FFN was found
    source: dict[str, Any] = field(default_factory=dict)  # how to rebuild the dense model


def build_pipeline(config: MoEConfig) -> list[Pass]:
    """The ordered passes that follow capture."""
    return [FindFFN(), SelectSites(), Switchify()]


def convert(model: nn.Module, config: MoEConfig | None = None, *, inplace: bool = False,
            progress: Callable[[str, int, int], None] | None = None,
            _skip_init: bool = False) -> nn.Module:
    """Return a Switch version of `model`; the input model is left untouched unless inplace.

    >>> sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=8))
    """
    config = config or MoEConfig()
    if not inplace:
        model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(config.seed)
    ctx = PassContext(config, generator, skip_init=_skip_init, progress=progress)
    program = PassManager(build_pipeline(config))(Program(model, capture(model)), ctx)
    out = program.model  # a new object when the whole model was one FFN
    out.moeify_record = ConversionRecord(
        config=config, sites=[SiteRecord.of(s) for s in ctx.notes["converted"]],
        skipped=ctx.notes.get("skipped", []), rejected=dict(ctx.notes.get("rejected", {})),
        source=dict(getattr(model, "moeify_source", None) or {}))
    return out


def _describe(activation: nn.Module) -> str:
    text = repr(activation)
    return text if len(text) < 60 else type(activation).__name__
