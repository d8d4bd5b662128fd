"""convert(): capture -> find_ffns -> select -> switchify, on a copy of the model.

Four plain functions, each taking and returning typed records:
  1. capture      Regions: each module with two Linear children traced on its own (regions.py)
  2. find_ffns    FFNSearch: Linear -> act -> [Dropout] -> Linear and gated FFNs, with every rejection's reason
  3. select       Selection: every/offset per stack, or a regex over the dense module names
  4. switchify    the model with each chosen FFN replaced by a SwitchFFN (upcycled by default)
--router-init hidden and --init moefy also run calibration text through the dense model between 3
and 4 (samples.py), then set routers from it and measure each layer (data_init.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from moeify.config import MoEConfig
from moeify.conversion.data_init import initialise_from_data
from moeify.conversion.find_ffn import FFNSite, find_ffns
from moeify.conversion.regions import capture
from moeify.conversion.report import InitReport
from moeify.conversion.samples import site_samples
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
    init_reports: dict[str, InitReport] = field(default_factory=dict)  # site -> what calibration measured

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


def convert(model: nn.Module, config: MoEConfig | None = None, *, inplace: bool = False,
            source: dict[str, Any] | None = None, progress: Callable[[str, int, int], None] | None = None,
            tokenizer: Any = None, _skip_init: bool = False) -> nn.Module:
    """Return a Switch version of `model`; the input model is left untouched unless inplace.

    `source` says how to rebuild the dense model (moeify's loaders fill it in; for a transformers
    model or your own module, save() works it out). `tokenizer` tokenises the calibration text of
    --router-init hidden and --init moefy (default: UTF-8 bytes).

    >>> sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=8))
    """
    config = config or MoEConfig()
    if not inplace:
        model = copy.deepcopy(model)
    regions = capture(model)
    search = find_ffns(regions)
    selection = select(search, config, type(model).__name__, len(regions))
    # Only these options read text, and only a model with values can run it (not meta, not a load).
    calibrate = config.reads_text and not _skip_init and not any(p.is_meta for p in model.parameters())
    samples = site_samples(model, selection.chosen, config, tokenizer) if calibrate else None
    out = switchify(model, regions, selection.chosen, config, init=not _skip_init, progress=progress)
    reports = initialise_from_data(out, selection.chosen, samples, config) if samples is not None else {}
    out.moeify_record = ConversionRecord(
        config=config, sites=selection.chosen, skipped=[s.region for s in selection.skipped],
        rejected=search.rejected, source=dict(source or {}), init_reports=reports)
    return out
