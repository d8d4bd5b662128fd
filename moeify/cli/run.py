"""`moeify run DIR --nproc N`: torchrun on this machine, one process per rank of an export."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from moeify.checkpoint.integrity import unverified
from moeify.errors import MoeifyError
from moeify.targets.distributed.entry import (
    ERRORS_ENV,
    check_export,
    check_options,
    option_args,
    read_rank_reports,
    run_options,
    torchrun,
)


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
    Exit status: 0 every rank finished; 2 a user error (one line, found here or by
    the rank that refused); 3 a rank lost contact with another; else torchrun's.
    """
    # Everything that can be refused without the ranks is refused here, before any process starts.
    if nproc is not None and nproc < 1:
        raise MoeifyError(f"--nproc must be at least 1, got {nproc}: leave it unset for the export's world size")
    check_options(options)
    with unverified(options["no_verify"]):
        manifest = check_export(directory)
    nproc = nproc or manifest.world_size
    if nproc != manifest.world_size:
        raise MoeifyError(f"{directory} was exported for {manifest.world_size} ranks: pass --nproc "
                          f"{manifest.world_size}, or export again with --world-size {nproc}")
    ctx.exit(launch(torchrun_command(directory, nproc, options)))


def launch(command: list[str]) -> int:
    """Run torchrun with the ranks' stdout passed through and their stderr held back: a rank's user error
    (which each rank writes to a file for this) becomes one MoeifyError here, a lost peer one line and
    exit 3; anything else shows the held-back output and keeps torchrun's status."""
    errors = Path(tempfile.mkdtemp(prefix="moeify-run-"))
    try:
        with tempfile.TemporaryFile() as held:
            proc = subprocess.Popen(command, stderr=held, env={**os.environ, ERRORS_ENV: str(errors)})
            try:
                code = proc.wait()
            except KeyboardInterrupt:  # torchrun got the Ctrl-C too (same process group) and stops the ranks
                proc.wait()
                _replay(held)
                raise
            reports = [r for r in read_rank_reports(errors) if r["code"] in (2, 3)]  # 1: a traceback, shown
            user = [r for r in reports if r["code"] == 2]
            if code != 0 and user:
                raise MoeifyError(user[0]["message"])
            if code != 0 and reports:
                click.echo(f"error: {reports[0]['message']}", err=True)
                return reports[0]["code"]
            _replay(held)
            return code
    finally:
        shutil.rmtree(errors, ignore_errors=True)


def _replay(held) -> None:
    """What the ranks and torchrun wrote on stderr, shown after all (warnings, a crashed rank's traceback)."""
    held.seek(0)
    sys.stderr.write(held.read().decode(errors="replace"))
    sys.stderr.flush()
