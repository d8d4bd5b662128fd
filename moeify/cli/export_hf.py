"""`moeify export --target hf-*|torch`: transformers checkpoints, and the moeify directory re-saved."""
from __future__ import annotations

import time
from pathlib import Path

from moeify.cli.common import console, table
from moeify.cli.targets import Target


def export_hf_target(target: Target, source: Path, output: Path, force: bool, flags: dict) -> None:
    from moeify.cli.progress import progress_bars
    from moeify.targets.hf.export import export_hf

    with progress_bars(console) as progress:
        result = export_hf(target.family, source, output, force=force, flags=flags, progress=progress,
                           show_bars=console.is_terminal)
    console.print(f"{source} -> {result.path}: {result.model_class}, {result.seconds:.1f}s")
    t = table("file", ("MiB", "right"))
    for name, size in result.files.items():
        t.add_row(name, f"{size / 2**20:.2f}")
    console.print(t)
    for note in result.notes:
        console.print(f"[yellow]note[/] {note}")
    console.print(f"[dim]transformers loads it: {result.model_class}.from_pretrained('{result.path}')[/]")


def export_torch_target(target: Target, source: Path, output: Path, force: bool, flags: dict) -> None:
    """The moeify directory written again: re-sharded, or after an import, with the current format."""
    from moeify.checkpoint.files import check_writable
    from moeify.checkpoint.store import load, save
    from moeify.cli.progress import progress_bars

    check_writable(output, force)
    t0 = time.perf_counter()
    with progress_bars(console) as progress:
        save(load(source, progress=progress), output, force=force, progress=progress, tokenizer_from=source)
    console.print(f"{source} -> {output}: moeify directory, {time.perf_counter() - t0:.1f}s")
