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
LAST_EVALS = 3  # validation losses averaged at the end (evaluations every 50 steps: the last 100 steps)


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


def mean_sd(values: list[float], digits: int = 3, signed: bool = False) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{'+' if signed else ''}.{digits}f} ± {sd:.{digits}f}"


def late_val(run: Run, end: float | None = None) -> float:
    """The mean validation loss at the last LAST_EVALS evaluation steps up to `end` (default: the run's last
    step), interpolated where `end` falls between evaluations: one evaluation moves by a few hundredths."""
    steps = [r.step for r in run.metrics.rows if r.val_loss is not None]
    end = steps[-1] if end is None else end
    every = steps[-1] - steps[-2]
    return statistics.mean(val_at_step(run, end - i * every) for i in range(LAST_EVALS))


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
             "Mean ± standard deviation over 3 seeds. Each seed has its own train/validation split, so losses "
             "differ more between seeds than between variants: Δ compares each run with the first row's run of "
             "the same seed (same split, same batches). At equal time: the validation loss at the step a variant "
             "reaches in the time the fastest variant takes for all its steps (step times from step_time.py)."
             if timed_ok else "Mean ± standard deviation over 3 seeds; Δ paired by seed, as above.", "",
             "| variant | seeds | val loss, last 3 evals | Δ vs first row, paired by seed | better in "
             "| Δ at equal time | dropped, 2nd half | max dropped | load CV, 2nd half | aux / uniform, 2nd half "
             "| tokens/s (shared machine) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fastest = min(step_times[key] for _, _, key in found) if timed_ok else None
    base_runs, base_key = found[0][1], found[0][2]
    base = {run.info.seed: late_val(run) for run in base_runs}
    base_timed = {run.info.seed: late_val(run, run.metrics.rows[-1].step * fastest / step_times[base_key])
                  for run in base_runs} if timed_ok else {}
    for label, rs, key in found:
        losses = [late_val(run) for run in rs]
        deltas = [late_val(run) - base[run.info.seed] for run in rs if run.info.seed in base]
        timed = ([late_val(run, run.metrics.rows[-1].step * fastest / step_times[key]) - base_timed[run.info.seed]
                  for run in rs if run.info.seed in base_timed] if timed_ok else [])
        speed = [run.metrics.rows[-1].tokens / run.metrics.rows[-1].wall_seconds for run in rs]
        switch = rs[0].metrics.layers
        dropped = [100 * statistics.mean(late(run, "dropped_fraction")) for run in rs] if switch else []
        worst = [100 * max(late(run, "dropped_fraction")) for run in rs] if switch else []
        cv = [statistics.mean(late(run, "load_cv_mean")) for run in rs] if switch else []
        aux = [statistics.mean(late(run, "aux_loss")) / len(run.metrics.layers) for run in rs] if switch else []
        first = label == found[0][0]
        lines.append(f"| {label} | {len(rs)} | {mean_sd(losses)} | {'-' if first else mean_sd(deltas, signed=True)} "
                     f"| {'-' if first else f'{sum(d < 0 for d in deltas)} of {len(deltas)}'} "
                     f"| {'-' if first or not timed else mean_sd(timed, signed=True)} "
                     f"| {mean_sd(dropped, 2) + ' %' if dropped else '-'} | {f'{max(worst):.1f} %' if worst else '-'} "
                     f"| {mean_sd(cv)} | {mean_sd(aux)} | {statistics.mean(speed):,.0f} |")
    return lines + [""]


def main(runs: Path) -> None:
    step_times = json.loads(STEP_TIMES.read_text()) if STEP_TIMES.is_file() else {}
    for title, variants in SECTIONS:
        print("\n".join(section(runs, title, variants, step_times)))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/results/runs")
