"""Shared by the benchmarks: paired ratios and their confidence intervals; a rich table written again as Markdown (for
the README) and JSON; argument types that refuse nonsense."""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (experts, tokens, rounds): argparse reports anything else in one
    line and exits with status 2, before any work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number above 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def round_orders(names: list[str], seed: int = 0):
    """An endless series of orders of `names`, one per round: each a fresh permutation (seeded, so a rerun repeats
    it), so that no step always follows the same other one. Rotating one order does not do that: it keeps every
    step's predecessor, and what a step leaves behind falls on its follower in every round (at E 1 / 64 tokens the
    Switch layer, always run just after transformers' layer and its many small ops, measured 0.04-0.06x more of the
    dense FFN's time than a copy of it that ran after it)."""
    rng = random.Random(seed)
    while True:
        yield rng.sample(names, len(names))


def paired(times: list[float], base: list[float]) -> list[float]:
    """times / base round by round, sorted: a host that speeds up or slows down over seconds moves both steps of a
    round alike, so their ratio is steadier than the ratio of two medians."""
    return sorted(a / b for a, b in zip(times, base, strict=True))


def interval(ratios: list[float]) -> tuple[float, float]:
    """95 % confidence interval of the median of sorted per-round ratios (sign test: order statistics), which
    narrows with more rounds where the ratios' own spread does not."""
    k = max(0, math.floor((len(ratios) - 1.96 * math.sqrt(len(ratios))) / 2))
    return ratios[k], ratios[len(ratios) - 1 - k]


def verdict(ratios: list[float], target: float) -> str:
    """"met" when the median's whole confidence interval is at or under the target, "missed" when all of it is over,
    else "not resolved" (more rounds may tell)."""
    low, high = interval(ratios)
    return "met" if high <= target else "missed" if low > target else "not resolved"


def report(title: str, header: list[str], rows: list[tuple[str, ...]], out: Path, notes: list[str] = ()) -> None:
    table = Table(title=title)
    for col in header:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs keep whole columns
    console.print(table)
    for note in notes:
        console.print(note)
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines + [""] + list(notes)) + "\n")
    records = [{col: _value(cell) for col, cell in zip(header, row)} for row in rows]
    out.with_suffix(".json").write_text(json.dumps({"title": title, "rows": records, "notes": list(notes)}, indent=1))
    console.print(f"wrote {out} and {out.with_suffix('.json').name}")


def _value(cell: str) -> float | str:
    """A number where the cell holds one ("12.5", "0.91x", "3"), else the text."""
    try:
        return float(cell.removesuffix("x"))
    except ValueError:
        return cell
