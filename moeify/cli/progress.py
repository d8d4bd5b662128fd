"""Rich progress bars for long conversions, saves and loads (silent when not a terminal)."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

LABELS = {"switchify": "converting FFNs", "save": "writing shards", "load": "reading shards",
          "plan": "evaluating layouts", "calibrate": "routing batches", "emit": "writing rank shards",
          "export": "exporting graphs", "check": "checking tensors", "write": "writing checkpoint"}


@contextlib.contextmanager
def progress_bars(console: Console) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a (stage, done, total) callback that draws one bar per stage."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bars:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(LABELS.get(stage, stage), total=total)
            bars.update(tasks[stage], completed=done)

        yield update
