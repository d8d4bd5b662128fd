"""export_hf: a moeify directory -> a transformers checkpoint of one family, refused early where it cannot be."""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from moeify.checkpoint.files import check_writable
from moeify.checkpoint.metadata import read_metadata, require_weights
from moeify.errors import MoeifyError

FAMILIES = ("switch", "mixtral", "qwen3_moe")  # modules of moeify.targets.hf, each with refuse() and to_hf()


@dataclass
class HFExport:
    """What was written: the directory, the transformers class, and what users should know."""

    path: Path
    model_class: str
    files: dict[str, int]  # file name -> bytes
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def export_hf(family: str, source: str | Path, output: str | Path, *, force: bool = False,
              flags: dict | None = None, progress: Callable[[str, int, int], None] | None = None,
              show_bars: bool = False) -> HFExport:
    """Write the converted model at `source` as a transformers checkpoint of `family` into `output`.

    The family refuses what it cannot express from moeify.json alone, before any weight is read;
    then the model is loaded, mapped to the family's class and written through write_hf.
    """
    from moeify.checkpoint.store import load
    from moeify.targets.hf.writer import write_hf

    if family not in FAMILIES:
        raise MoeifyError(f"unknown Hugging Face family {family!r}: one of {', '.join(FAMILIES)}")
    t0 = time.perf_counter()
    source, output, flags = Path(source), Path(output), dict(flags or {})
    check_writable(output, force)
    meta = read_metadata(source)
    module = importlib.import_module(f"moeify.targets.hf.{family}")
    module.refuse(meta, flags)
    require_weights(source, meta, "exporting a checkpoint")
    model = load(source, progress=progress).eval()
    ckpt = module.to_hf(model, flags)
    write_hf(ckpt, output, force=force, tokenizer_dir=source, progress=progress, show_bars=show_bars)
    files = {p.name: p.stat().st_size for p in sorted(output.iterdir()) if p.is_file()}
    return HFExport(output, ckpt.model_class, files, list(ckpt.notes), time.perf_counter() - t0)
