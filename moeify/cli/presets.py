"""`moeify presets`: the built-in model configs."""
from __future__ import annotations

import click
from rich.table import Table

from moeify.checkpoint.model_presets import PRESETS
from moeify.cli.common import console


@click.command("presets")
def presets_cmd() -> None:
    """List the built-in model presets (random init, seeded by --seed).

    Switch presets also set the MoE options of the paper; flags given to convert override them.
    """
    table = Table()
    table.add_column("name", no_wrap=True)
    for col in ("d_model", "d_ff", "layers"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("ffn", no_wrap=True)
    table.add_column("experts", no_wrap=True)
    for p in PRESETS.values():
        moe = f"{p.moe['num_experts']}, every {p.moe['every']}" if p.moe else "-"
        table.add_row(p.name, str(p.t5["d_model"]), str(p.t5["d_ff"]),
                      f"{p.t5['num_layers']}+{p.t5['num_layers']}", p.t5["feed_forward_proj"], moe)
    console.print(table)
