"""The `moeify` command line: a thin click layer over the public API."""
from __future__ import annotations

import signal

import click

from moeify.cli.calibrate import calibrate_cmd
from moeify.cli.common import console, option_flag
from moeify.cli.compare import compare_cmd
from moeify.cli.convert import convert_cmd
from moeify.cli.export import export_cmd
from moeify.cli.inspect import inspect_cmd
from moeify.cli.plan import plan_cmd
from moeify.cli.presets import presets_cmd
from moeify.cli.run import run_cmd
from moeify.cli.train import train_cmd
from moeify.errors import MoeifyError

EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and kill send before SIGKILL) raised as an interrupt, so that everything a
    Ctrl-C runs on the way out runs for it too: atomic writes remove their temporaries, and train stops at once as
    on a second Ctrl-C (its `except KeyboardInterrupt`), keeping its last complete checkpoint."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated()


def _set_sigterm(handler) -> None:
    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, TypeError):  # not the main thread (an embedding application's worker): its handling stays
        pass


# `moeify run` only waits on torchrun, which takes SIGTERM itself and hands it to the ranks: an exception here would
# kill torchrun before the ranks heard of it.
KEEP_SIGTERM = ("run",)


def _command_path(ctx: click.Context) -> str:
    """`moeify export`, whatever name the program was started under (`python -m moeify.cli`, a test runner)."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["moeify", *reversed(names)])


class _Group(click.Group):
    """Turns user mistakes (MoeifyError, and click's usage errors) into one line on stderr and exit status 2, and
    SIGTERM into one line and exit status 143 after the same cleanup as a Ctrl-C."""

    def invoke(self, ctx: click.Context):
        previous = signal.getsignal(signal.SIGTERM)  # main() installs the handler once the command is known
        try:
            return super().invoke(ctx)
        except MoeifyError as e:
            click.echo(f"error: {e.render(option_flag)}", err=True)  # options named as flags
            ctx.exit(2)
        except click.UsageError as e:  # click's own checks (an unknown option, a bad choice): one line too
            command = _command_path(e.ctx or ctx)
            message = " ".join(e.format_message().split()).rstrip(".")  # click lists choices one per line
            click.echo(f"error: {message}: see `{command} --help`", err=True)
            ctx.exit(2)
        except Terminated:
            click.echo("terminated by SIGTERM: stopped before finishing, no output left half-written",
                       err=True)
            ctx.exit(EXIT_TERMINATED)
        finally:
            if signal.getsignal(signal.SIGTERM) is not previous:
                _set_sigterm(previous)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moeify")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Compile dense transformers into Switch Transformer mixture-of-experts models.

    \b
    moeify convert t5-small --experts 8 -o out/switch-t5-small  # preset -> Switch
    moeify inspect out/switch-t5-small                # layers, experts, params
    moeify plan out/switch-t5-small --topology dgx-h100 --nodes 2  # sharding
    moeify export out/switch-t5-small --target onnx -o out/onnx  # onnxruntime
    moeify export out/switch-t5-small --target torch-distributed \\
        --world-size 4 -o out/dist4                   # one shard per rank
    moeify run out/dist4 --steps 10 --train   # torchrun, one process per rank
    moeify train t5-tiny --experts 4 --steps 200 -o runs/e4  # train on text
    moeify presets                                     # built-in model configs
    """
    if ctx.invoked_subcommand not in KEEP_SIGTERM:
        _set_sigterm(_on_sigterm)


for command in (convert_cmd, plan_cmd, calibrate_cmd, export_cmd, run_cmd, inspect_cmd, presets_cmd,
                compare_cmd, train_cmd):
    main.add_command(command)

__all__ = ["main", "console"]
