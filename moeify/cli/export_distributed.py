"""`moeify export --target torch-distributed`: per-rank shards, the plan and a sha256 manifest."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from moeify.cli.common import console, table
from moeify.cli.targets import Target
from moeify.errors import MoeifyError

if TYPE_CHECKING:
    from rich.console import Console

    from moeify.targets.distributed.export import DistributedExport


def print_export(export: DistributedExport, console: Console) -> None:
    """What `moeify export --target torch-distributed` shows: one row per rank's shard."""
    from moeify.planner.plan import expert_ranges

    plan, manifest = export.plan, export.manifest
    dp, ep = plan.mesh.shape
    estimated = "" if plan.model.get("estimated", True) else ", default plan (not estimated)"
    console.print(f"{export.path}: {plan.world_size} ranks, mesh dp={dp} x ep={ep}{estimated}")
    t = table(("rank", "right"), "file", ("MiB", "right"), "experts per layer")
    for r in manifest.ranks:
        held = {expert_ranges(ids) for ids in r.experts.values()}
        what = f"{held.pop()} in each of {len(r.experts)} layers" if len(held) == 1 else "varies (see manifest.json)"
        t.add_row(str(r.rank), r.file, f"{manifest.files[r.file]['bytes'] / 2**20:.1f}", what)
    console.print(t)
    sizes = [manifest.files[r.file]["bytes"] for r in manifest.ranks]
    console.print(f"manifest.json: {len(manifest.files)} files with sha256; largest shard "
                  f"{max(sizes) / 2**20:.1f} MiB, all shards {sum(sizes) / 2**20:.1f} MiB "
                  "(dense weights are in every shard)")


def check_disk(source: Path, output: Path, world_size: int) -> None:
    """Refuse, before any shard is written, an export the disk under `output` cannot hold: every shard carries
    the dense weights, so `world_size` copies of them plus the experts at least."""
    from moeify.checkpoint.metadata import read_metadata
    from moeify.planner.resources import free_disk, weight_bytes

    summary = read_metadata(source)["summary"]
    dense = weight_bytes(summary, "dense_params")
    need = (world_size - 1) * dense + weight_bytes(summary)
    free, where = free_disk(output) or (None, None)
    if free is not None and need > free:
        fits = max(1, (free - need + world_size * dense) // max(dense, 1))
        raise MoeifyError(f"{world_size} ranks need at least {need / 2**30:,.1f} GiB on disk (each shard holds the "
                          f"{dense / 2**20:,.1f} MiB of dense weights), {free / 2**30:,.1f} GiB is free under {where}: "
                          f"export for fewer ranks (about {fits:,} fit), or to another disk with -o")


def export_distributed_target(target: Target, source: Path, output: Path, force: bool, flags: dict) -> None:
    """Reads `plan` (a path), `world_size` and `allow_uneven` from `flags`."""
    from moeify.cli.progress import progress_bars

    world_size = flags.get("world_size")
    if world_size is not None and world_size < 1:
        raise MoeifyError(f"--world-size must be a positive integer, got {world_size}")
    if world_size is None and flags.get("plan") is not None:
        from moeify.planner.plan import ShardingPlan

        world_size = ShardingPlan.load(flags["plan"]).world_size
    if world_size is not None:
        check_disk(source, output, world_size)
    from moeify.targets.distributed.export import export_distributed

    with progress_bars(console) as progress:
        export = export_distributed(source, output, flags.get("plan"), world_size=flags.get("world_size"),
                                    allow_uneven=bool(flags.get("allow_uneven")), force=force, progress=progress)
    print_export(export, console)
