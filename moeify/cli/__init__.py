"""The `moeify` command line: a thin click layer over the public API."""
from __future__ import annotations

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


class _Group(click.Group):
    """Turns user mistakes (MoeifyError) into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoeifyError as e:
            click.echo(f"error: {e.render(option_flag)}", err=True)  # options named as flags
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moeify")
def main() -> None:
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


for command in (convert_cmd, plan_cmd, calibrate_cmd, export_cmd, run_cmd, inspect_cmd, presets_cmd,
                compare_cmd, train_cmd):
    main.add_command(command)

__all__ = ["main", "console"]
