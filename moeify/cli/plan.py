"""`moeify plan`: lay a Switch model out on a GPU cluster and estimate what all-to-all costs."""
from __future__ import annotations

from pathlib import Path

import click

from moeify.checkpoint.metadata import MOEIFY_FILE, read_metadata, saved_summary
from moeify.checkpoint.model_presets import resolve_source
from moeify.checkpoint.records import ModelSummary
from moeify.cli.common import (
    check_output_file,
    console,
    moe_config,
    moe_options,
    table,
    verify_option,
)
from moeify.errors import MoeifyError, opt
from moeify.planner.workload import DTYPE_BYTES

# The planner's choices, spelled out so that `moeify plan --help` imports neither networkx nor
# scipy (moeify.planner.hardware, .cost and .search do); tests/test_startup.py checks that they match.
GPUS = ("A100-PCIE-80GB", "A100-SXM4-80GB", "H100-PCIE-80GB", "H100-SXM5-80GB")  # hardware.GPUS
DEFAULT_GPU = "A100-SXM4-80GB"  # hardware.DEFAULT_GPU
OPTIMIZERS = ("adafactor", "adam")  # cost.OPTIMIZER_BYTES_PER_PARAM
LAYOUTS = ("contiguous", "strided")  # search.LAYOUTS
ALGORITHMS = ("flat", "hierarchical")  # search.ALGORITHMS
DRAW_FORMATS = ("png", "svg", "pdf")  # matplotlib's savefig writes each, chosen by the suffix
RUN_TIME_FLAGS = ("capacity_factor",)  # the one MoE flag a plan of a converted model applies (to its workload)


def model_summary(source: str, flags: dict) -> ModelSummary:
    """A converted directory's saved summary, or a preset / HF directory converted (a SwitchTransformers
    one imported) on meta."""
    if (Path(source) / MOEIFY_FILE).is_file():
        meta = read_metadata(source)
        from moeify.checkpoint.integrity import verify

        verify(source)  # every file, not only moeify.json: refused now, not when the export loads it
        return saved_summary(meta)
    from moeify.checkpoint.hf_switch import is_switch_directory

    if is_switch_directory(source):
        from moeify.checkpoint.summary import summarize
        from moeify.checkpoint.switch_import import import_switch

        return summarize(import_switch(source, device="meta", overrides=flags))
    config = moe_config(source, flags)
    from moeify.checkpoint.sources import load_dense
    from moeify.checkpoint.summary import summarize
    from moeify.conversion.pipeline import convert

    dense = load_dense(source, device="meta", seed=config.seed)
    return summarize(convert(dense.model, config, inplace=True, source=dense.source))


@click.command("plan", short_help="Plan expert sharding over a GPU cluster, with costs.")
@verify_option
@click.argument("source")
@click.option("--topology", "topology_spec", required=True, metavar="SPEC",
              help="A preset (dgx-a100, dgx-h100, hgx-a100-4, pcie-gen4-8, pcie-gen5-8, localhost-gloo), "
                   "`nvidia-smi topo -m` output (.txt), or a networkx graph (.json node-link, .graphml).")
@click.option("--nodes", type=int, default=1, show_default=True, help="Hosts, joined by InfiniBand through a switch.")
@click.option("--gpu", type=click.Choice(GPUS), default=DEFAULT_GPU, show_default=True,
              help="GPU model of an `nvidia-smi topo -m` file, which does not name it (sets NVLink, PCIe "
                   "and InfiniBand generations too).")
@click.option("--tokens-per-rank", type=int, default=8192, show_default=True, help="Tokens each GPU processes per step.")
@click.option("--dtype", type=click.Choice(sorted(DTYPE_BYTES)), default="bfloat16", show_default=True,
              help="Training precision planned for.")
@click.option("--load", "load_file", type=click.Path(path_type=Path), default=None,
              help="Per-expert token loads from `moeify calibrate`: placement balances them.")
@click.option("--replicate-hot", type=int, default=0, show_default=True,
              help="With --load: give the N hottest experts of each layer a second copy.")
@click.option("--allow-uneven", is_flag=True, help="Allow ranks to hold different numbers of experts.")
@click.option("--expert-parallel", type=int, default=None, help="Force this expert-parallel size.")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None, help="Force a rank layout [default: search].")
@click.option("--all-to-all", "algorithm", type=click.Choice(ALGORITHMS), default=None,
              help="Force an all-to-all algorithm [default: search].")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True,
              help="Sets training memory per parameter: adam 16 bytes (mixed precision), adafactor 8 "
                   "(as Switch Transformers trained).")
@click.option("--efficiency", type=float, default=0.5, show_default=True, help="Fraction of peak FLOPs reached.")
@moe_options
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("plan.json"), show_default=True,
              help="Where to write the plan (JSON, for `moeify export --plan` and `moeify inspect`).")
@click.option("--draw", type=click.Path(path_type=Path), default=None,
              help="Also draw the placement: PNG, SVG or PDF by the suffix (.png, .svg, .pdf).")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
def plan_cmd(source: str, topology_spec: str, nodes: int, gpu: str, tokens_per_rank: int, dtype: str, load_file: Path | None,
             replicate_hot: int, allow_uneven: bool, expert_parallel: int | None, layout: str | None,
             algorithm: str | None, optimizer: str, efficiency: float, output: Path, draw: Path | None, force: bool,
             **flags) -> None:
    """Plan expert sharding of SOURCE over a GPU topology and write the plan as JSON.

    SOURCE is a `moeify convert` output, or a preset / Hugging Face directory that is converted
    on the meta device with the MoE flags. The search covers data x expert parallel meshes,
    contiguous or strided rank layouts, flat or hierarchical (2D) all-to-all, and expert
    placement; it keeps the fastest plan that fits in GPU memory. Every all-to-all estimate is
    shown beside a lower bound (GPU injection and host NIC bandwidth) that no schedule beats.

    \b
    Examples:
      moeify plan out/switch-t5-base --topology dgx-h100 --nodes 4 -o plan.json
      moeify plan switch-c-2048 --topology dgx-h100 --nodes 32 -o c.json
      moeify plan out/x --topology topo.txt --nodes 2 --draw plan.png
      moeify inspect plan.json
    """
    inputs = [source, *(f for f in (load_file, topology_spec) if f is not None)]
    check_output_file(output, force, "plan.json", inputs)
    if draw is not None:
        if draw.suffix.lower().lstrip(".") not in DRAW_FORMATS:
            raise MoeifyError(f"--draw {draw}: matplotlib writes the format its suffix names, and "
                              f"{draw.suffix or 'no suffix'} is none of {', '.join('.' + f for f in DRAW_FORMATS)}: "
                              f"name the file {draw.with_suffix('.png').name}, or .svg or .pdf")
        check_output_file(draw, force, "plan.png", inputs)
    if not 0 < efficiency <= 1:  # also nan, which every comparison fails
        raise MoeifyError(f"--efficiency must be in (0, 1], got {efficiency}: pass the fraction of peak FLOPs "
                          "reached, e.g. 0.5")
    if replicate_hot < 0:
        raise MoeifyError(f"--replicate-hot must be >= 0, got {replicate_hot}")
    if replicate_hot and load_file is None:
        raise MoeifyError("--replicate-hot copies the experts that calibration found hot: add --load load.json "
                          "(from `moeify calibrate`), or drop --replicate-hot")
    converted = (Path(source) / MOEIFY_FILE).is_file()
    if converted:
        _refuse_moe_flags(source, flags)
    else:
        config = moe_config(source, flags)  # bad MoE flags and a typo in SOURCE fail before the planner is imported
        resolve_source(source)
    from moeify.cli.progress import progress_bars
    from moeify.planner.search import Planner, SearchOptions
    from moeify.planner.topology import load_topology
    from moeify.planner.workload import read_load, workload_from_summary

    size = _topology_size(topology_spec, nodes, gpu)
    # Before the topology is built and the model converted on meta, which take time and memory in the
    # GPUs and the experts too; again below with every layer's experts.
    _check_memory(size, 0 if converted else config.num_experts, topology_spec, nodes, "use fewer --experts")
    topology = load_topology(topology_spec, nodes, gpu)
    summary = model_summary(source, flags)
    _check_memory(size, sum(layer.num_experts for layer in summary.moe_layers), topology_spec, nodes,
                  "convert with fewer --experts" if converted else "use fewer --experts")
    load = read_load(load_file) if load_file else None
    workload = workload_from_summary(summary, dtype=dtype, tokens_per_rank=tokens_per_rank, load=load,
                                     capacity_factor=flags.get("capacity_factor"))
    options = SearchOptions(
        layouts=(layout,) if layout else LAYOUTS, algorithms=(algorithm,) if algorithm else ALGORITHMS,
        allow_uneven=allow_uneven, replicate_hot=replicate_hot, efficiency=efficiency,
        expert_parallel=expert_parallel, optimizer=optimizer)
    with progress_bars(console) as progress:
        planner = Planner(topology, workload, options)
        plan = planner.plan(progress)
    if draw is not None:  # before the plan is written: a drawing that fails leaves no plan behind
        from moeify.planner.draw import draw_plan

        draw_plan(plan, topology, draw)
    plan.save(output)
    print_plan_summary(plan)
    if draw is not None:
        console.print(f"drew {draw}")
    console.print(f"wrote {output}")


def _refuse_moe_flags(source: str, flags: dict) -> None:
    """A converted directory's experts and routing are in its weights and moeify.json: MoE flags would be ignored."""
    given = {k: v for k, v in flags.items() if v is not None and k not in RUN_TIME_FLAGS}
    if given:
        what = "experts are" if "num_experts" in given else "MoE options are"
        named = ", ".join(opt(k, v) if isinstance(v, bool) else opt(k) for k, v in given.items())
        raise MoeifyError(f"{source} is already converted; its {what} fixed: drop {named} (or plan the dense "
                          "model with them)")


def _topology_size(spec: str, nodes: int, gpu: str) -> tuple[int, int, int] | None:
    """(GPUs, graph nodes, GPUs per host) of the topology `spec` x `nodes`, without building the whole
    graph (a preset builds one host, a file is read once); None where load_topology will refuse the spec."""
    from moeify.planner.hardware import HOSTS, build_host
    from moeify.planner.topology import GLOO_PRESET, load_topology

    name, _, count = spec.partition(":")
    if name == GLOO_PRESET:
        if nodes != 1 or (count and not (count.isdigit() and int(count) >= 1)):
            return None
        ranks = int(count or 2)
        return ranks, ranks + 1, ranks
    if spec in HOSTS:
        host = build_host(HOSTS[spec])
        per_host = HOSTS[spec].gpus
    elif nodes < 1:
        return None
    else:
        host = load_topology(spec, 1, gpu)  # one host, cheap: its errors come first anyway
        per_host, host = len(host.gpus), host.graph
    return per_host * nodes, len(host) * nodes + 1, per_host


def _check_memory(size: tuple[int, int, int] | None, experts: int, spec: str, nodes: int, fewer_experts: str) -> None:
    """Refuse, before the work, a plan whose routes (every GPU pair) and placements (every expert) would take
    more memory than this machine has, saying about how much and what fits."""
    from moeify.planner.cost import DIJKSTRA_BYTES_PER_NODE, ROUTE_BYTES_PER_PAIR, experts_bytes, routes_bytes
    from moeify.planner.resources import MEMORY_FRACTION, available_memory

    available = available_memory()
    if available is None or size is None:
        return
    gpus, graph_nodes, per_host = size
    routes, placed = routes_bytes(gpus, graph_nodes), experts_bytes(experts)
    budget = MEMORY_FRACTION * available
    if routes + placed <= budget:
        return
    if placed >= routes:
        fix = fewer_experts
    else:  # the GPU count that fits: routes grow with its square
        per_pair = ROUTE_BYTES_PER_PAIR + DIJKSTRA_BYTES_PER_NODE * graph_nodes / gpus
        fits = int((max(budget - placed, 0) / per_pair) ** 0.5)
        if spec.partition(":")[0] == "localhost-gloo":
            fix = f"plan fewer ranks, e.g. localhost-gloo:{max(fits, 1)}"
        else:
            fix = (f"plan fewer --nodes (about {max(fits // per_host, 1)} fit)" if nodes > 1
                   else "plan a smaller topology")
    subject = f"{experts} experts on {gpus} GPUs" if experts else f"{gpus} GPUs"
    raise MoeifyError(f"planning {subject} needs about {(routes + placed) / 2**30:,.0f} GiB "
                      f"of memory, {available / 2**30:.1f} GiB is available: {fix}")


def print_plan_summary(plan) -> None:
    t, e = plan.topology, plan.estimate
    console.print(f"{plan.model.get('name', 'model')} on {t.get('name')} "
                  f"({plan.world_size} GPUs, {t.get('device')}), {plan.model.get('tokens_per_rank')} tokens per GPU")
    t = table("", "dp x ep", "layout", "all-to-all", ("step\nms", "right"), ("a2a\nms", "right"),
              ("bound\nms", "right"), ("GB per\nGPU", "right"), "fits", title="candidates (fastest first; * = chosen)")
    chosen = (plan.mesh.shape[1], plan.layout)
    for c in plan.alternatives:
        mark = "*" if (c["expert_parallel"], c["layout"]) == chosen else ""
        t.add_row(mark, f"{c['data_parallel']} x {c['expert_parallel']}", c["layout"], " + ".join(c["all_to_all"]),
                  f"{c['step_ms']:.1f}", f"{c['all_to_all_ms']:.1f}", f"{c['lower_bound_ms']:.1f}",
                  f"{c['memory_per_rank_bytes'] / 1e9:.1f}", "yes" if c["fits"] else "no")
    console.print(t)
    console.print(f"step {e.step_ms:.1f} ms = compute {e.compute_ms:.1f} + all-to-all {e.all_to_all_ms:.1f} "
                  f"(bound {e.lower_bound_ms:.1f}) + gradient all-reduce {e.allreduce_ms:.1f}; "
                  f"memory {e.memory_per_rank_bytes / 1e9:.1f} of {e.memory_limit_bytes / 1e9:.1f} GB per GPU")
    if e.busiest_link:
        console.print(f"busiest link: {' -> '.join(e.busiest_link)}")
