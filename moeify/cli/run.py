"""`moeify run DIR --nproc N`: torchrun on this machine, one process per rank of an export."""
from __future__ import annotations

import subprocess
from pathlib import Path

import click

from moeify.errors import MoeifyError
from moeify.targets.distributed.entry import option_args, run_options, torchrun


def torchrun_command(directory: Path, nproc: int, options: dict) -> list[str]:
    return torchrun(nproc, "moeify.run", str(directory), *option_args(options))


@click.command("run", short_help="Run a torch-distributed export with torchrun.")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--nproc", type=int, default=None, help="Processes to start [default: the export's world size].")
@run_options
@click.pass_context
def run_cmd(ctx: click.Context, directory: Path, nproc: int | None, **options) -> None:
    """Run a torch-distributed export on this machine: torchrun starts one process per rank (gloo on
    CPUs, NCCL on GPUs); rank 0 prints throughput and router statistics.

    \b
    Examples:
      moeify run out/dist4 --nproc 4 --steps 10 --train
      moeify run out/dist4 --steps 3 --batch 4 --seq 128     # forward only
    Exit status: torchrun's (0 when every rank finished).
    """
    from moeify.targets.distributed.manifest import read_export_manifest

    manifest = read_export_manifest(directory)  # fail here, before starting processes
    nproc = nproc or manifest.world_size
    if nproc != manifest.world_size:
        raise MoeifyError(f"{directory} was exported for {manifest.world_size} ranks: pass --nproc "
                          f"{manifest.world_size}, or export again with --world-size {nproc}")
    ctx.exit(subprocess.call(torchrun_command(directory, nproc, options)))
