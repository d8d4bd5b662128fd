"""Comparing runs: validation curves, a common loss threshold, one summary row per run, seeds grouped into variants."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

from moeify.errors import MoeifyError
from moeify.training.runs import METRICS_FILE, Run, RunInfo

PER_SEED = ("name", "seed")  # the run.json fields in which seeds of one variant may differ


@dataclass(frozen=True)
class ValPoint:
    step: int
    seconds: float
    loss: float


def val_points(run: Run) -> list[ValPoint]:
    """The rows with a validation loss; a MoeifyError when the run has none."""
    points = [ValPoint(r.step, r.wall_seconds, r.val_loss) for r in run.metrics.rows if r.val_loss is not None]
    if not points:
        raise MoeifyError(f"{run.path / METRICS_FILE} has no validation loss (every val_loss cell is empty): "
                          "nothing to compare")
    return points


@dataclass(frozen=True)
class RunSummary:
    """One table row. Losses are None where no finite value exists; the *_to_threshold fields where the run
    never reached the threshold."""

    name: str
    path: str
    final_val_loss: float
    best_val_loss: float | None
    steps_to_threshold: int | None
    seconds_to_threshold: float | None
    params_total: int
    params_active: int
    tokens_per_second: float | None  # tokens / wall seconds of the last logged row


@dataclass(frozen=True)
class Comparison:
    threshold: float
    threshold_given: bool  # False: the default, the worst of the runs' best losses
    runs: list[RunSummary]
    variants: list[list[str]]  # run names, grouped by variant

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def best_loss(points: list[ValPoint]) -> float | None:
    """The lowest finite validation loss: a diverged evaluation (nan, inf) is never the best."""
    finite = [p.loss for p in points if math.isfinite(p.loss)]
    return min(finite) if finite else None


def default_threshold(runs: list[Run]) -> float:
    """The worst of the runs' best losses: the lowest loss that every run reaches."""
    bests = [b for b in (best_loss(val_points(r)) for r in runs) if b is not None]
    if not bests:
        raise MoeifyError("no run has a finite validation loss: pass --threshold LOSS")
    return max(bests)


def summarize(run: Run, threshold: float) -> RunSummary:
    points = val_points(run)
    reached = next((p for p in points if p.loss <= threshold), None)
    last = run.metrics.rows[-1]
    return RunSummary(
        name=run.info.name, path=str(run.path), final_val_loss=points[-1].loss, best_val_loss=best_loss(points),
        steps_to_threshold=reached.step if reached else None, seconds_to_threshold=reached.seconds if reached else None,
        params_total=run.info.params_total, params_active=run.info.params_active,
        tokens_per_second=last.tokens / last.wall_seconds if last.wall_seconds > 0 else None)


def compare(runs: list[Run], threshold: float | None = None) -> Comparison:
    """Every run checked (validation rows present) before any is summarised."""
    for run in runs:
        val_points(run)
    given = threshold is not None
    threshold = threshold if given else default_threshold(runs)
    return Comparison(threshold, given, [summarize(r, threshold) for r in runs],
                      [[r.info.name for r in group] for group in group_variants(runs)])


def variant_key(info: RunInfo) -> str:
    """What makes a variant: its --group when it has one, else every run.json field but the per-seed ones
    (the conversion's seed is the run's), as canonical JSON."""
    if info.group is not None:
        return json.dumps({"group": info.group})
    fields = {k: v for k, v in dataclasses.asdict(info).items() if k not in PER_SEED}
    if fields["moe_config"] is not None:
        fields["moe_config"] = {k: v for k, v in fields["moe_config"].items() if k != "seed"}
    return json.dumps(fields, sort_keys=True)


def group_variants(runs: list[Run]) -> list[list[Run]]:
    """Runs grouped by variant_key, groups and runs in the order first given."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(variant_key(run.info), []).append(run)
    return list(groups.values())


def variant_name(names: list[str]) -> str:
    """What seeds' run names share, less a trailing seed marker: dense-s0, dense-s1 -> dense."""
    shared = re.sub(r"[-_. ]*(seed|s)?$", "", os.path.commonprefix(names))
    return shared or names[0]


@dataclass(frozen=True)
class Curve:
    """A variant's validation loss at the steps all its runs evaluated: mean, min and max over seeds.

    Wall clocks differ between seeds, so the band is aligned by step and drawn at the mean time."""

    label: str
    steps: list[int]
    seconds: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]


def curve(variant: list[Run]) -> Curve:
    by_run = [{p.step: p for p in val_points(r)} for r in variant]
    steps = sorted(set.intersection(*(set(points) for points in by_run)))
    if not steps:
        raise MoeifyError(f"runs {', '.join(r.info.name for r in variant)} are one variant but share no "
                          "validation step: evaluate them at the same steps")
    losses = [[points[s].loss for points in by_run] for s in steps]
    n = len(variant)
    label = (variant[0].info.group or variant_name([r.info.name for r in variant])) + (f" ({n} seeds)" if n > 1 else "")
    return Curve(label, steps, [sum(points[s].seconds for points in by_run) / n for s in steps],
                 [sum(ls) / n for ls in losses], [min(ls) for ls in losses], [max(ls) for ls in losses])
