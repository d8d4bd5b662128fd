"""`moeify inspect`: what a converted model or a sharding plan holds."""
from __future__ import annotations

import json
from pathlib import Path

import click
from rich import box
from rich.table import Table

from moeify.checkpoint.metadata import read_metadata
from moeify.checkpoint.summary import ModelSummary
from moeify.cli.common import console, human
from moeify.cli.plan import print_plan_summary
from moeify.planner.draw import experts_by_rank
from moeify.planner.plan import ShardingPlan, expert_ranges
from moeify.targets.onnx.report import inspect_onnx


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the same data as JSON.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Show a converted model (parameters, active parameters per token, Switch layers),
    a sharding plan (mesh, groups, placement, costs) or an exported ONNX graph (inputs and
    outputs, op histogram, Switch layers and their lowering, MoE nodes, sizes).

    \b
    Examples:
      moeify inspect out/switch-t5-small
      moeify inspect out/switch-t5-small --json | jq .active_params
      moeify inspect plan.json
      moeify inspect out/onnx/encoder_model.onnx
    """
    if path.suffix == ".onnx":
        return inspect_onnx(path, as_json, console)
    if path.suffix == ".json" and not path.is_dir():
        return _inspect_plan(path, as_json)
    _inspect_model(path, as_json)


def _inspect_model(path: Path, as_json: bool) -> None:
    meta = read_metadata(path)
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


def _inspect_plan(path: Path, as_json: bool) -> None:
    plan = ShardingPlan.load(path)
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
        return
    print_plan_summary(plan)
    groups = Table(title=f"mesh {plan.mesh.shape[0]} x {plan.mesh.shape[1]} ({' x '.join(plan.mesh.dim_names)}), "
                         f"{plan.layout} layout")
    groups.add_column("expert-parallel group")
    groups.add_column("ranks", overflow="fold")
    shown = plan.expert_parallel_groups[:8]
    for i, g in enumerate(shown):
        groups.add_row(str(i), " ".join(map(str, g)))
    if len(plan.expert_parallel_groups) > len(shown):
        groups.add_row("...", f"{len(plan.expert_parallel_groups) - len(shown)} more groups")
    console.print(groups)
    layers = Table(title="layers", box=box.SIMPLE_HEAD)
    layers.add_column("layer", overflow="fold")
    for col in ("experts", "all-to-all", "a2a ms", "bound ms", "compute ms"):
        layers.add_column(col, justify="left" if col == "all-to-all" else "right", no_wrap=True)
    for layer in plan.layers:
        layers.add_row(layer.name, str(layer.num_experts), layer.all_to_all, f"{layer.all_to_all_ms:.2f}",
                       f"{layer.lower_bound_ms:.2f}", f"{layer.compute_ms:.2f}")
    console.print(layers)
    first = plan.layers[0]
    same = all(layer.placement == first.placement and layer.replicas == first.replicas for layer in plan.layers)
    placement = Table(title=f"placement ({'all layers' if same else first.name}), in every expert-parallel group",
                      box=box.SIMPLE_HEAD)
    placement.add_column("group rank", justify="right")
    placement.add_column("experts", overflow="fold")
    held = experts_by_rank(plan)
    for group_rank, rank in enumerate(plan.expert_parallel_groups[0][:16]):
        placement.add_row(str(group_rank), expert_ranges(held.get(rank, [])))
    console.print(placement)
