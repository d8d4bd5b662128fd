"""Calibration: run a converted model on real text and record how many tokens each expert gets."""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from moeify.layers.collector import router_losses

LOAD_SCHEMA = "moeify.load"


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterator[dict], *, total: int | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Per Switch layer: tokens routed to each expert (before capacity) and the dropped fraction."""
    model.eval()
    counts: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    with router_losses(model) as losses:
        for i, batch in enumerate(batches):
            losses.clear()
            model(**batch)
            for r in losses.layers:
                counts[r.name] = counts.get(r.name, 0) + r.tokens_per_expert
                dropped[r.name] = dropped.get(r.name, 0) + r.dropped
            if progress:
                progress("calibrate", i + 1, total or i + 1)
    layers = {}
    for name, c in counts.items():
        n = int(c.sum())
        layers[name] = {"tokens": c.tolist(), "fraction": (c.double() / max(n, 1)).tolist(),
                        "dropped_fraction": dropped[name] / max(n, 1)}
    return {"schema": LOAD_SCHEMA, "version": 1, "model": type(model).__name__, "layers": layers}
