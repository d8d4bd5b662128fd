"""docs/results.md's tables, from the committed runs: losses at equal steps and equal time, drops and balance.

    .venv/bin/python benchmarks/study/tables.py [docs/results/runs]
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from moeify.training.runs import Run, read_run

ROOT = Path(__file__).resolve().parents[2]
# (section, [(label, run-name prefix before "-s<seed>", its step-time key in step_time.json or None)]): the
# comparisons docs/results.md reports. Equal time is taken from step_time.py's quiet measurement, because the
# study's own wall clocks ran on a shared machine.
SECTIONS = [
    ("From scratch (600 steps)", [("dense", "dense", "dense"), ("Switch-8", "switch8", "Switch-8"),
                                  ("Switch-16", "switch16", "Switch-16")]),
    ("Upcycling (300 dense steps, then 300 more)", [("dense, continued", "dense-continued", "dense"),
                                                     ("upcycled Switch-8, scale none", "upcycled8", "Switch-8"),
                                                     ("upcycled Switch-8, scale auto", "upcycled8-auto", "Switch-8")]),
    ("Router precision (Switch-8, bf16 autocast)", [("router float32", "bf16-router-fp32", None),
                                                     ("router bfloat16", "bf16-router-bf16", None)]),
]
STEP_TIMES = ROOT / "docs/results/step_time.json"
LATE = 0.5  # "late in training": the second half of the logged steps


def seeds(runs: Path, prefix: str) -> list[Run]:
    return [read_run(p) for p in sorted(runs.glob(f"{prefix}-s[0-9]"))]


def val_at_step(run: Run, step: float) -> float:
    """The validation loss at `step`, linear between evaluations."""
    points = [(r.step, r.val_loss) for r in run.metrics.rows if r.val_loss is not None]
    before = [p for p in points if p[0] <= step] or points[:1]
    after = [p for p in points if p[0] > step]
    if not after:
        return before[-1][1]
    (s0, v0), (s1, v1) = before[-1], after[0]
    return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


def mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def late(run: Run, field: str) -> list[float]:
    rows = run.metrics.rows
    values = [getattr(r, field) for r in rows[int(len(rows) * LATE):]]
    return [v for v in values if v is not None]


def section(runs: Path, title: str, variants: list[tuple[str, str, str | None]], step_times: dict) -> list[str]:
    found = [(label, seeds(runs, prefix), key) for label, prefix, key in variants]
    found = [(label, rs, key) for label, rs, key in found if rs]
    if not found:
        return []
    timed_ok = all(key in step_times for _, _, key in found)
    lines = [f"### {title}", "",
             "Mean ± standard deviation over seeds. At equal time: the validation loss at the step a variant "
             "reaches in the time the section's fastest variant takes for all its steps (step times from "
             "step_time.py)." if timed_ok else "Mean ± standard deviation over seeds.", "",
             "| variant | seeds | val loss, last step | val loss at equal time | tokens/s (shared machine) "
             "| dropped, 2nd half | max dropped, 2nd half | load CV, 2nd half | aux / uniform, 2nd half |",
             "|---|---|---|---|---|---|---|---|---|"]
    fastest = min(step_times[key] for _, _, key in found) if timed_ok else None
    for label, rs, key in found:
        final = [[r.val_loss for r in run.metrics.rows if r.val_loss is not None][-1] for run in rs]
        timed = ([val_at_step(run, run.metrics.rows[-1].step * fastest / step_times[key]) for run in rs]
                 if timed_ok else [])
        speed = [run.metrics.rows[-1].tokens / run.metrics.rows[-1].wall_seconds for run in rs]
        switch = rs[0].metrics.layers
        dropped = [statistics.mean(late(run, "dropped_fraction")) for run in rs] if switch else []
        worst = [max(late(run, "dropped_fraction")) for run in rs] if switch else []
        cv = [statistics.mean(late(run, "load_cv_mean")) for run in rs] if switch else []
        aux = [statistics.mean(late(run, "aux_loss")) / len(run.metrics.layers) for run in rs] if switch else []
        pct = [100 * d for d in dropped]
        lines.append(f"| {label} | {len(rs)} | {mean_sd(final)} | {mean_sd(timed)} | {statistics.mean(speed):,.0f} "
                     f"| {mean_sd(pct, 2) + ' %' if pct else '-'} | "
                     f"{f'{100 * max(worst):.2f} %' if worst else '-'} | {mean_sd(cv)} | {mean_sd(aux)} |")
    return lines + [""]


def main(runs: Path) -> None:
    step_times = json.loads(STEP_TIMES.read_text()) if STEP_TIMES.is_file() else {}
    for title, variants in SECTIONS:
        print("\n".join(section(runs, title, variants, step_times)))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/results/runs")
