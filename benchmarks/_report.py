"""Shared by the benchmarks: print a rich table and write the same rows as Markdown for the README."""
from __future__ import annotations

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
    console.print(f"wrote {out}")
