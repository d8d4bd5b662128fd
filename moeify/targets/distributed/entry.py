"""`torchrun -m moeify.run DIR`: every process loads its rank's part of an export and runs steps."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import click

from moeify.errors import MoeifyError

# (flag, parameter, click options): shared with `moeify run`, which forwards them to torchrun.
RUN_OPTIONS = [
    ("--steps", "steps", dict(type=int, default=10, show_default=True, help="Steps to run.")),
    ("--train", "train", dict(is_flag=True, help="Training steps (loss, backward, AdamW) instead of forward only.")),
    ("--batch", "batch", dict(type=int, default=8, show_default=True, help="Sequences per rank per step.")),
    ("--seq", "seq", dict(type=int, default=64, show_default=True, help="Tokens per sequence (T5 decoders: SEQ/4).")),
    ("--lr", "lr", dict(type=float, default=1e-4, show_default=True, help="AdamW learning rate (with --train).")),
    ("--seed", "seed", dict(type=int, default=0, show_default=True, help="Seeds the synthetic batches.")),
    ("--data", "data", dict(type=click.Path(path_type=Path), default=None,
                            help="safetensors file with input_ids [N, S] (optional decoder_input_ids, labels) "
                                 "instead of synthetic batches.")),
    ("--timeout", "timeout_s", dict(type=float, default=300.0, show_default=True,
                                    help="Seconds before a hung or dead rank makes the others fail.")),
    ("--log-every", "log_every", dict(type=int, default=0, show_default=True,
                                      help="Rank 0 prints a line every N steps (0: summary only).")),
]


def run_options(f):
    options = [click.option(flag, name, **kw) for flag, name, kw in RUN_OPTIONS]
    return functools.reduce(lambda g, option: option(g), reversed(options), f)


def option_args(values: dict) -> list[str]:
    """The command-line form of parsed run options, to hand them on to each process."""
    args = []
    for flag, name, kw in RUN_OPTIONS:
        value = values.get(name)
        if kw.get("is_flag"):
            args += [flag] if value else []
        elif value is not None:
            args += [flag, str(value)]
    return args


def torchrun(nproc: int, module: str, *args: str) -> list[str]:
    """`python -m torch.distributed.run` (the same program as `torchrun`) starting `python -m MODULE ARGS`
    once per rank on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


def fail(message: str, code: int) -> NoReturn:
    """`error: MESSAGE` on stderr and exit `code`."""
    from moeify.targets.distributed import comm

    click.echo(f"error: {message}", err=True)
    if comm.is_initialized():
        # A normal exit would run gloo's destructors with peers gone or mid-collective, which
        # can abort the process (SIGABRT) and lose the exit status: leave at once instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


@contextlib.contextmanager
def rank_errors(report: Callable[[str, int], None] | None = None) -> Iterator[None]:
    """A rank's errors as the exit-status convention: another rank failed (RankFailure) 3, a user error 2,
    each one line `error: [rank R: ]MESSAGE`. `report(message, code)` sees the message first, its option
    references unrendered (MoeifyError.render), e.g. to pass it on to a launcher."""
    from moeify.targets.distributed import comm
    from moeify.targets.distributed.failures import RankFailure

    try:
        yield
    except MoeifyError as e:
        code = 3 if isinstance(e, RankFailure) else 2
        rank = comm.get_rank() if comm.is_initialized() and code == 2 else None
        prefix = "" if rank is None else f"rank {rank}: "
        if report is not None:
            report(prefix + (str(e.args[0]) if e.args else ""), code)
        fail(prefix + str(e), code)


def print_report(report, console) -> None:
    """Rank 0's summary: throughput, then router statistics in a table that reads at 80 columns."""
    from rich import box
    from rich.table import Table

    kind = "training" if report.train else "forward"
    line = (f"{report.world_size} ranks, {report.steps} {kind} steps: {report.tokens_per_second:,.0f} tokens/s "
            f"({report.timed_tokens:,} tokens in {report.seconds:.2f} s")
    line += ", first step untimed)" if report.steps > 1 else ")"
    if report.loss is not None:
        line += f"; last loss {report.loss:.4f} (mean over ranks)"
    console.print(line)
    # With top-k routing a token is counted once per choice: say so rather than call those tokens.
    unit = "tokens" if all(s.top_k == 1 for s in report.layers) else "assignments"
    table = Table(title=f"router statistics over all ranks: dropped {report.dropped_fraction:.1%} of {unit}",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    # Long count lists wrap in the width the layer names and the dropped column leave them.
    name_width = max((len(s.name) for s in report.layers), default=5)
    counts_width = console.width - name_width - len("dropped") - 4  # 4: the two column gaps
    table.add_column("layer", overflow="fold")
    table.add_column(f"{unit} per expert", overflow="fold", max_width=counts_width if counts_width >= 12 else None)
    table.add_column("dropped", justify="right", overflow="fold")
    for s in report.layers:
        table.add_row(s.name, " ".join(str(n) for n in s.tokens_per_expert), f"{s.dropped_fraction:.1%}")
    console.print(table)


@click.command("moeify.run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("directory", type=click.Path(path_type=Path))
@run_options
def main(directory: Path, **options) -> None:
    """Run one rank of a torch-distributed export (launched by torchrun, which sets RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR and MASTER_PORT). Rank 0 prints throughput and router statistics.

    \b
    torchrun --nproc-per-node 4 -m moeify.run out/dist4 --steps 10 --train
    moeify run out/dist4 --nproc 4 --steps 10 --train   # the same, for one machine
    Exit status: 0 done, 2 a user error (bad directory, corrupt shard), 3 another rank failed.
    """
    from rich.console import Console

    from moeify.targets.distributed import comm
    from moeify.targets.distributed.steps import RunConfig, run_steps

    with rank_errors():
        report = run_steps(RunConfig(path=directory, **options), log=functools.partial(print, flush=True))
    if comm.get_rank() == 0:
        # Under torchrun stdout is a pipe, where rich would wrap at 80 columns: let rows be one line.
        print_report(report, Console(highlight=False, width=None if sys.stdout.isatty() else 200))
    comm.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
