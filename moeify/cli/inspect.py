"""`moeify inspect`: what a converted model or a sharding plan holds."""
from __future__ import annotations

import json
from pathlib import Path

import click

from moeify.checkpoint.files import indexed_shards, safetensors_header  # torch-free, as inspect stays
from moeify.checkpoint.metadata import WEIGHTS_STEM, read_metadata, saved_summary
from moeify.cli.common import console, human, print_init_reports, table, verify_option
from moeify.cli.plan import print_plan_summary
from moeify.errors import MoeifyError
from moeify.planner.plan import ShardingPlan, expert_ranges, id_runs


@click.command("inspect", short_help="Show a converted model, a plan or an ONNX graph.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the same data as JSON.")
@verify_option
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
        return _inspect_onnx(path, as_json)
    if path.suffix == ".json" and not path.is_dir():
        return _inspect_plan(path, as_json)
    _inspect_model(path, as_json)


def _inspect_model(path: Path, as_json: bool) -> None:
    meta = read_metadata(path)
    if meta["weights"]:
        check_weight_files(path)
    integrity = check_integrity(path)
    data = {**meta["summary"], "source": meta["source"], "moe_config": meta["moe_config"],
            "weights": meta["weights"], "integrity": integrity}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    s = saved_summary(meta)
    layers = s.moe_layers
    origin = (meta["source"].get("name") or meta["source"].get("path") or meta["source"].get("class")
              or "a module instance")
    console.print(f"[bold]{path}[/]: {s.model} from {origin}, {s.dtype}"
                  f"{'' if meta['weights'] else ', structure only (no weights)'}")
    console.print(f"parameters: {human(s.total_params)} total, {human(s.active_params)} active per token, "
                  f"{len(layers)} Switch layers x {s.num_experts} experts (exact counts: --json)")
    console.print(f"files: {integrity}")
    if layers:
        console.print(f"routing: {routing_line(layers[0].routing)}")
    # The experts column only where layers differ: the line above gives the count otherwise.
    varied = any(row.num_experts != s.num_experts for row in layers)
    t = table("layer", *([("experts", "right")] if varied else []), ("d_model", "right"), ("d_ff", "right"), "gated",
              ("capacity", "right"), ("params", "right"))
    t.caption = "capacity: train/eval capacity factor, or dropless; params: expert parameters"
    for row in layers:
        t.add_row(row.name, *([str(row.num_experts)] if varied else []), str(row.d_model), str(row.d_ff),
                  "yes" if row.gated else "no",
                  "dropless" if row.routing.dropless else
                  f"{row.routing.capacity_factor}/{row.routing.eval_capacity_factor}", human(row.expert_params))
    console.print(t)
    moe = meta["moe_config"]
    print_init_reports(layers, moe.get("init", "upcycle"), moe.get("router_init", "random"))


def check_weight_files(path: Path) -> None:
    """Each weight file moeify.json's directory should hold is there with a whole safetensors header, so an
    empty or cut copy is named here rather than reported as a fine model (the tensors themselves are not read)."""
    index = path / f"{WEIGHTS_STEM}.safetensors.index.json"
    if index.is_file():
        names = indexed_shards(index)
        if not names:
            raise MoeifyError(f"{index} lists no weight files: convert the model again")
    else:
        names = [f"{WEIGHTS_STEM}.safetensors"]
    for name in names:
        file = path / name
        if not file.is_file():
            raise MoeifyError(f"{file} is missing: copy the whole directory again, or convert the model again")
        size = file.stat().st_size
        if size == 0:
            raise MoeifyError(f"{file} is empty (0 bytes): copy it again, or convert the model again")
        if safetensors_header(file) is None:
            raise MoeifyError(f"{file} is not a whole safetensors file ({size} bytes, its header cut or unreadable): "
                              "copy it again, or convert the model again")


def check_integrity(directory: Path, names: list[str] | None = None) -> str:
    """Check `names` (default: every file) against the directory's moeify-manifest.json, as loading would; refuse a
    difference with the file's name, and say in words what was checked."""
    from moeify.checkpoint.integrity import MANIFEST_FILE, Verifier, skipped

    verifier = Verifier(directory)
    if skipped():
        return "not checked against their sha256 (--no-verify)"
    if verifier.entries is None:
        return f"not checked: no {MANIFEST_FILE} (written before moeify wrote manifests)"
    if names is None:
        verifier.check_all()
    for name in names or []:
        verifier.check(name)
    n = len(verifier.checked)
    return f"{n} file{'s' if n != 1 else ''} checked: sha256 and size as in {MANIFEST_FILE}"


def routing_line(r) -> str:
    """How a layer routes, in words: 'top-1, gate = probability, capacity factor 1.25 (eval 2.0)'."""
    gates = "renormalised gates" if r.normalize_gates else "gate = probability"
    capacity = ("dropless: capacity factors ignored" if r.dropless
                else f"capacity factor {r.capacity_factor} (eval {r.eval_capacity_factor}, min {r.min_capacity})")
    return f"top-{r.top_k}, {gates}, {capacity}"


SHOWN_OPS = 12  # the op histogram's longest rows; --json has them all


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _inspect_onnx(path: Path, as_json: bool) -> None:
    from rich.markup import escape

    from moeify.targets.onnx.report import describe

    if path.is_file() and path.stat().st_size == 0:
        raise MoeifyError(f"{path} is empty (0 bytes): export it again with `moeify export ... --target onnx`")
    graph_files = [path.name] + ([f"{path.name}.data"] if path.with_name(f"{path.name}.data").is_file() else [])
    integrity = check_integrity(path.parent, graph_files)
    data = describe(path)
    if not data["nodes"] and not data["opsets"]:  # an empty protobuf message parses as an empty model
        raise MoeifyError(f"{path} holds no ONNX graph: export it again with `moeify export ... --target onnx`")
    data["integrity"] = integrity
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    opsets = ", ".join(f"{d} {v}" for d, v in data["opsets"].items())
    weights = ", ".join(f"{_size(b)} {d}" for d, b in data["weight_bytes"].items()) or "none"
    console.print(f"[bold]{escape(str(path))}[/]: {data['nodes']} nodes, {data['initializers']} initializers "
                  f"({weights}), {_size(data['file_bytes'])} on disk; opsets {opsets}")
    console.print(f"files: {integrity}")
    io = table("", "name", "dtype", "shape", title="inputs and outputs")
    for kind in ("inputs", "outputs"):
        for v in data[kind]:
            io.add_row(kind[:-1], v["name"], v["dtype"], escape("[" + ", ".join(map(str, v["shape"])) + "]"))
    console.print(io)
    ops = table("op", ("count", "right"), title=f"ops ({len(data['ops'])} types)")
    for op, n in list(data["ops"].items())[:SHOWN_OPS]:
        ops.add_row(op, str(n))
    rest = list(data["ops"].items())[SHOWN_OPS:]
    moe = {"com.microsoft.MoE", "com.microsoft.QMoE"}
    for op, n in rest:  # never hide the fused nodes
        if op in moe:
            ops.add_row(op, str(n))
    if rest:
        ops.add_row(f"{len(rest)} more (--json)", str(sum(n for op, n in rest if op not in moe)))
    console.print(ops)
    if data["switch_layers"]:
        layers = table("layer", "lowering", "ffn", ("experts", "right"), "capacity",
                       title=f"Switch layers ({data['mode']} mode, {data['dtype']})")
        layers.caption = ("experts: E, or k of E where a token picks k > 1; fused: com.microsoft.MoE keeps "
                          "every token; portable: eval capacity factor (min slots); norm: gates renormalised")
        for row in data["switch_layers"]:
            # Files written before top-k lack top_k, normalize_gates and dropless: top-1 with a capacity.
            k = row.get("top_k", 1)
            capacity = ("dropless" if row["lowering"] in ("fused", "qmoe") or row.get("dropless", False)
                        else f"{row['eval_capacity_factor']} (min {row['min_capacity']})")
            lowering = f"qmoe int{row['weight_bits']}" if "weight_bits" in row else row["lowering"]
            layers.add_row(row["name"], lowering, ("gated " if row["gated"] else "") + row["activation"],
                           f"{k} of {row['num_experts']}" if k > 1 else str(row["num_experts"]),
                           ("norm, " if row.get("normalize_gates", False) else "") + capacity)
        console.print(layers)
        for row in data["switch_layers"]:
            if row["reason"]:
                console.print(f"[yellow]portable fallback[/] {escape(row['name'])}: {escape(row['reason'])}")
    for n in data["moe_nodes"]:
        k = f"k={n['k']}" + (" normalised" if n["normalize_routing_weights"] else "")
        op = f"QMoE node (int{n['weight_bits']})" if n.get("op") == "QMoE" else "MoE node"
        console.print(escape(f"{op} {n['name']}: {k}, {n['activation_type']}, fc1 {n['fc1_shape']}"))


SHOWN_RANKS = 16  # placement rows of the first expert-parallel group; --json has them all


def _inspect_plan(path: Path, as_json: bool) -> None:
    plan = ShardingPlan.load(path)
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
        return
    print_plan_summary(plan)
    from moeify.planner.draw import experts_by_rank

    n = len(plan.expert_parallel_groups)
    console.print(f"mesh {plan.mesh.shape[0]} x {plan.mesh.shape[1]} ({' x '.join(plan.mesh.dim_names)}), "
                  f"{plan.layout} layout; {n} expert-parallel group{'' if n == 1 else 's'}:")
    groups = table(("group", "right"), "ranks")
    shown = plan.expert_parallel_groups[:8]
    for i, g in enumerate(shown):
        groups.add_row(str(i), " ".join(str(a) if b == a + 1 else f"{a}-{b - 1}" for a, b in id_runs(g)))
    if len(plan.expert_parallel_groups) > len(shown):
        groups.add_row("...", f"{len(plan.expert_parallel_groups) - len(shown)} more groups")
    console.print(groups)
    counts = {layer.num_experts for layer in plan.layers}
    varied = len(counts) > 1  # an experts column only where layers differ; the title gives the count otherwise
    layers = table("layer", *([("experts", "right")] if varied else []), "all-to-all", ("a2a\nms", "right"),
                   ("bound\nms", "right"), ("compute\nms", "right"),
                   title="layers" if varied else f"layers ({counts.pop()} experts each)")
    for layer in plan.layers:
        layers.add_row(layer.name, *([str(layer.num_experts)] if varied else []), layer.all_to_all,
                       f"{layer.all_to_all_ms:.2f}", f"{layer.lower_bound_ms:.2f}", f"{layer.compute_ms:.2f}")
    console.print(layers)
    first = plan.layers[0]
    same = all(layer.placement == first.placement and layer.replicas == first.replicas for layer in plan.layers)
    console.print(f"placement ({'all layers' if same else first.name}), the same in every expert-parallel group:")
    placement = table(("rank in\ngroup", "right"), "experts")
    held = experts_by_rank(plan)
    group = plan.expert_parallel_groups[0]
    for group_rank, rank in enumerate(group[:SHOWN_RANKS]):
        placement.add_row(str(group_rank), expert_ranges(held.get(rank, [])))
    if len(group) > SHOWN_RANKS:
        placement.add_row("...", f"{len(group) - SHOWN_RANKS} more ranks (--json)")
    console.print(placement)
