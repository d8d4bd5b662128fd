"""`torchrun -m moeify.run DIR`: every process loads its rank's part of an export and runs steps."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import click

from moeify.checkpoint.files import safetensors_header
from moeify.checkpoint.integrity import unverified
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
    ("--no-verify", "no_verify",
     dict(is_flag=True, help="Skip the sha256 of moeify.json, plan.json and the shards against manifest.json, for "
                             "very large trusted exports: a tampered or corrupted file then goes unnoticed.")),
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


ERRORS_ENV = "MOEIFY_RUN_ERRORS"  # set by `moeify run`: the folder where each rank writes its error for it


def check_options(options: dict) -> None:
    """The run flags, refused where they are given: by `moeify run` before torchrun starts, and by each rank
    before it joins the others (under a bare torchrun). Torch-free, as the launcher is."""
    def refuse(name: str, problem: str) -> NoReturn:
        flag, default = next((flag, kw["default"]) for flag, n, kw in RUN_OPTIONS if n == name)
        raise MoeifyError(f"{flag} {problem}, got {options[name]}: leave it unset for {flag} {default}, the default")

    for name in ("steps", "batch", "seq"):
        if options.get(name) is not None and options[name] < 1:
            refuse(name, "must be at least 1")
    if options.get("timeout_s") is not None and not 0 < options["timeout_s"] < math.inf:  # nan fails both
        refuse("timeout_s", "must be a positive number of seconds")
    if options.get("lr") is not None and not 0 < options["lr"] < math.inf:
        refuse("lr", "must be a positive number")
    if (options.get("log_every") or 0) < 0:
        refuse("log_every", "must be at least 0 (0: the summary only)")
    if options.get("data") is not None:
        check_data_file(Path(options["data"]))


def check_data_file(path: Path) -> None:
    """--data: a safetensors file whose header holds a 2-D input_ids with rows (the tensors are not read)."""
    if not path.is_file():
        raise MoeifyError(f"--data {path} does not exist: pass a safetensors file with input_ids [N, S]")
    header = safetensors_header(path)
    if header is None:
        raise MoeifyError(f"--data {path} is not a safetensors file: save the token ids with "
                          "safetensors.torch.save_file({'input_ids': ids}, PATH)")
    shape = header.get("input_ids", {}).get("shape") if isinstance(header.get("input_ids"), dict) else None
    if not isinstance(shape, list) or len(shape) != 2:
        raise MoeifyError(f"--data {path} has no 2-D input_ids tensor: store token ids as input_ids [N, S]")
    if 0 in shape:
        raise MoeifyError(f"--data {path} has input_ids of shape {shape}: give at least one row of tokens")


def data_lengths(path: Path | None) -> tuple[int, int] | None:
    """--data's (input, decoder) sequence lengths from its header (the decoder's: decoder_input_ids, else labels,
    else input_ids, which training uses as labels); None without --data."""
    if path is None:
        return None
    header = safetensors_header(Path(path)) or {}
    shapes = [header[k]["shape"] for k in ("input_ids", "decoder_input_ids", "labels")
              if isinstance(header.get(k), dict) and isinstance(header[k].get("shape"), list)
              and len(header[k]["shape"]) == 2]
    return (shapes[0][1], shapes[-1][1] if len(shapes) > 1 else shapes[0][1]) if shapes else None


def check_export(directory: Path, world_size: int | None = None):
    """What every process can check alike without the others, before any process group exists: the manifest,
    `world_size` (the ranks running; None: not yet known), the plan against the model, the shared files'
    sha256, and that every shard is there, of its manifest size, and made for its rank of this world size.
    Each rank's own shard is hashed later, by the rank, with all ranks agreeing (loader.load_rank).
    Returns the Manifest."""
    from moeify.checkpoint.files import read_json
    from moeify.checkpoint.metadata import MOEIFY_FILE
    from moeify.planner.plan import ShardingPlan
    from moeify.targets.distributed.manifest import PLAN_FILE, read_export_manifest, verify

    manifest = read_export_manifest(directory)
    world = manifest.world_size
    if world_size is not None and world_size != world:
        raise MoeifyError(f"{directory} was exported for {world} ranks but {world_size} are running: "
                          f"launch with --nproc {world}")
    if [r.rank for r in manifest.ranks] != list(range(world)):
        raise MoeifyError(f"{directory / 'manifest.json'} does not list ranks 0..{world - 1}: re-run `moeify export`")
    for name in (MOEIFY_FILE, PLAN_FILE):
        if not (directory / name).is_file():
            raise MoeifyError(f"{directory / name} is missing: copy the whole export directory, or re-run "
                              "`moeify export`")
    plan = ShardingPlan.load(directory / PLAN_FILE)
    meta = read_json(directory / MOEIFY_FILE, fix="re-run `moeify export`")
    try:
        layers = {layer["name"]: layer["num_experts"] for layer in meta["summary"]["moe_layers"]}
    except (KeyError, TypeError):
        raise MoeifyError(f"{directory / MOEIFY_FILE} lists no Switch layers: re-run `moeify export`") from None
    planned = {layer.name: layer.num_experts for layer in plan.layers}
    extra, missing = sorted(set(planned) - set(layers)), sorted(set(layers) - set(planned))
    if plan.world_size != world:
        what = f"{plan.world_size} ranks, the export {world}"
    elif extra:
        what = f"it places {extra[:2]}, which the model lacks"
    elif missing:
        what = f"it lacks {missing[:2]}"
    else:
        wrong = [n for n in sorted(layers) if layers[n] != planned[n]]
        what = f"{wrong[0]} has {layers[wrong[0]]} experts, the plan {planned[wrong[0]]}" if wrong else None
    if what is not None:
        raise MoeifyError(f"{directory / PLAN_FILE} is a plan for another model or export ({what}): copy the "
                          "export's own plan.json back, or re-run `moeify export`")
    verify(directory, manifest, [MOEIFY_FILE, PLAN_FILE])
    for shard in manifest.ranks:
        path = directory / shard.file
        if not path.is_file():
            raise MoeifyError(f"{path} is missing: copy the whole export directory, or re-run `moeify export`")
        entry = manifest.files.get(shard.file, {})
        header = safetensors_header(path)
        made_for = (header or {}).get("__metadata__") or {}
        if path.stat().st_size != entry.get("bytes") or made_for.get("rank") != str(shard.rank) \
                or made_for.get("world_size") != str(world):
            raise MoeifyError(f"{path} is not the shard this export's manifest lists (another export's, or cut "
                              "short): copy the whole export directory again, or re-run `moeify export`")
    return manifest


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
    from moeify.targets.distributed.failures import PeerRefused, RankFailure

    try:
        yield
    except MoeifyError as e:
        code = 3 if isinstance(e, RankFailure) else 2
        # Before the process group exists the rank is torchrun's RANK; outside a launcher there is none.
        rank = (comm.get_rank() if comm.is_initialized() else os.environ.get("RANK") or None) if code == 2 else None
        prefix = "" if rank is None else f"rank {rank}: "
        if report is not None and not isinstance(e, PeerRefused):  # the rank that refused reports the cause
            report(prefix + (str(e.args[0]) if e.args else ""), code)
        fail(prefix + str(e), code)


def _launcher_report() -> Callable[[str, int], None] | None:
    """Under `moeify run` (ERRORS_ENV set): write this rank's error where the launcher reads it, so the user sees
    it once, as one line, instead of once per rank and torchrun's traceback."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder:
        return None

    def report(message: str, code: int) -> None:
        with contextlib.suppress(OSError):  # the launcher then shows torchrun's own output instead
            write_rank_report(Path(folder), message, code)
    return report


def write_rank_report(folder: Path, message: str, code: int) -> None:
    """This rank's error (`code`: 1 a bug, 2 a user error, 3 a lost peer) for its launcher (`moeify run`,
    `moeify train --nproc`), which reads them all with read_rank_reports."""
    rank = int(os.environ.get("RANK", "0"))
    (folder / f"rank-{rank:05d}.json").write_text(json.dumps({"code": code, "message": message}))


def read_rank_reports(folder: Path) -> list[dict]:
    """The ranks' errors in rank order; one cut short (its rank killed while writing) is left out."""
    reports = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and isinstance(report.get("message"), str) and report.get("code") in (1, 2, 3):
            reports.append(report)
    return reports


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
    from moeify.targets.distributed.env import LaunchEnv

    with rank_errors(_launcher_report()):
        # Every check that needs no other rank comes before the process group: each rank refuses alike,
        # at once, instead of joining a group that then waits or times out.
        env = LaunchEnv.from_environ()
        check_options(options)
        with unverified(options.pop("no_verify", False)):
            manifest = check_export(directory, env.world_size)
            from moeify.targets.distributed.budget import check_step_fits

            shard = manifest.ranks[env.rank].file
            check_step_fits(directory, manifest.files[shard]["bytes"], options, data_lengths(options.get("data")),
                            env.local_rank)
            from moeify.targets.distributed.steps import RunConfig, run_steps

            report = run_steps(RunConfig(path=directory, **options), log=functools.partial(print, flush=True))
    if comm.get_rank() == 0:
        # Under torchrun stdout is a pipe, where rich would wrap at 80 columns: let rows be one line.
        print_report(report, Console(highlight=False, width=None if sys.stdout.isatty() else 200))
    comm.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
