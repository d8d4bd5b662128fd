"""convert(): capture -> find_ffns -> select -> switchify, on a copy of the model.

Four plain functions, each taking and returning typed records:
  1. capture      Regions: each module with two Linear children traced on its own (regions.py)
  2. find_ffns    FFNSearch: Linear -> act -> [Dropout] -> Linear and gated FFNs, with every rejection's reason
  3. select       Selection: every/offset per stack, or a regex over the dense module names
  4. switchify    the model with each chosen FFN replaced by a SwitchFFN (upcycled by default)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from moeify.config import MoEConfig
from moeify.conversion.find_ffn import FFNSite, find_ffns
from moeify.conversion.regions import capture
from moeify.conversion.select import select
from moeify.conversion.switchify import switchify


@dataclass
class ConversionRecord:
    """What a conversion did. Attached to the converted model as `model.moeify_record`."""

    config: MoEConfig
    sites: list[FFNSite]  # converted, in module order
    skipped: list[str] = field(default_factory=list)  # matched FFN modules that selection left dense
    rejected: dict[str, str] = field(default_factory=dict)  # candidate module -> why no FFN was found
    source: dict[str, Any] = field(default_factory=dict)  # how to rebuild the dense model

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


def convert(model: nn.Module, config: MoEConfig | None = None, *, inplace: bool = False,
            source: dict[str, Any] | None = None, progress: Callable[[str, int, int], None] | None = None,
            _skip_init: bool = False) -> nn.Module:
    """Return a Switch version of `model`; the input model is left untouched unless inplace.

    `source` says how to rebuild the dense model (moeify's loaders fill it in; for a transformers
    model or your own module, save() works it out).

    >>> sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=8))
    """
    config = config or MoEConfig()
    if not inplace:
        model = copy.deepcopy(model)
    regions = capture(model)
    search = find_ffns(regions)
    selection = select(search, config, type(model).__name__, len(regions))
    out = switchify(model, regions, selection.chosen, config, init=not _skip_init, progress=progress)
    out.moeify_record = ConversionRecord(
        config=config, sites=selection.chosen, skipped=[s.region for s in selection.skipped],
        rejected=search.rejected, source=dict(source or {}))
    return out
