"""Shared by the benchmarks: print a rich table and write the same rows as Markdown (for the README) and JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


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
