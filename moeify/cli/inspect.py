"""`moeify inspect`: what a converted model holds."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..summary import ModelSummary
from ..targets.torch_local import read_manifest
from .common import console, human


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the same data as JSON.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Show a converted model: parameters, active parameters per token, Switch layers.

    \b
    Examples:
      moeify inspect out/switch-t5-small
      moeify inspect out/switch-t5-small --json | jq .active_params
    """
    meta = read_manifest(path)
    data = {**meta["summary"], "source": meta["source"], "moe_config": meta["moe_config"],
            "weights": meta["weights"]}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    s = ModelSummary(**{**meta["summary"], "moe_layers": []})
    layers = meta["summary"]["moe_layers"]
    origin = meta["source"].get("name") or meta["source"].get("path") or meta["source"].get("class")
    console.print(f"[bold]{path}[/]: {s.model} from {origin}, {s.dtype}"
                  f"{'' if meta['weights'] else ', structure only (no weights)'}")
    console.print(f"parameters: {human(s.total_params)} total, {human(s.active_params)} active per token, "
                  f"{len(layers)} Switch layers x {s.num_experts} experts (exact counts: --json)")
    table = Table()
    width = max((len(row["name"]) for row in layers), default=5)
    table.add_column("layer", min_width=min(width, 48), overflow="fold")
    for col in ("experts", "d_model", "d_ff", "gated", "capacity", "params"):
        table.add_column(col, justify="right")
    for row in layers:
        table.add_row(row["name"], str(row["num_experts"]), str(row["d_model"]), str(row["d_ff"]),
                      "yes" if row["gated"] else "no",
                      f"{row['capacity_factor']}/{row['eval_capacity_factor']}", human(row["expert_params"]))
    console.print(table)
