"""`moeify plan`: lay a Switch model out on a GPU cluster and estimate what all-to-all costs."""
from __future__ import annotations

from pathlib import Path

import click

from moeify.checkpoint.files import check_file_writable
from moeify.checkpoint.metadata import MOEIFY_FILE, read_metadata, saved_summary
from moeify.checkpoint.model_presets import resolve_source
from moeify.checkpoint.records import ModelSummary
from moeify.cli.common import console, moe_config, moe_options, table
from moeify.errors import MoeifyError
from moeify.planner.workload import DTYPE_BYTES

# The planner's choices, spelled out so that `moeify plan --help` imports neither networkx nor
# scipy (moeify.planner.hardware, .cost and .search do); tests/test_startup.py checks that they match.
GPUS = ("A100-PCIE-80GB", "A100-SXM4-80GB", "H100-PCIE-80GB", "H100-SXM5-80GB")  # hardware.GPUS
DEFAULT_GPU = "A100-SXM4-80GB"  # hardware.DEFAULT_GPU
OPTIMIZERS = ("adafactor", "adam")  # cost.OPTIMIZER_BYTES_PER_PARAM
LAYOUTS = ("contiguous", "strided")  # search.LAYOUTS
ALGORITHMS = ("flat", "hierarchical")  # search.ALGORITHMS


def model_summary(source: str, flags: dict) -> ModelSummary:
    """A converted directory's saved summary, or a preset / HF directory converted (a SwitchTransformers
    one imported) on meta."""
    if (Path(source) / MOEIFY_FILE).is_file():
        return saved_summary(read_metadata(source))
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
@click.option("--draw", type=click.Path(path_type=Path), default=None, help="Also draw the placement as a PNG.")
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
    for path in (output, draw):
        check_file_writable(path, force)
    if efficiency <= 0 or efficiency > 1:
        raise MoeifyError(f"--efficiency must be in (0, 1], got {efficiency}")
    if replicate_hot < 0:
        raise MoeifyError(f"--replicate-hot must be >= 0, got {replicate_hot}")
    if not (Path(source) / MOEIFY_FILE).is_file():
        moe_config(source, flags)  # bad MoE flags and a typo in SOURCE fail before the planner is imported
        resolve_source(source)
    from moeify.cli.progress import progress_bars
    from moeify.planner.search import Planner, SearchOptions
    from moeify.planner.topology import load_topology
    from moeify.planner.workload import read_load, workload_from_summary

    topology = load_topology(topology_spec, nodes, gpu)
    summary = model_summary(source, flags)
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
    plan.save(output)
    print_plan_summary(plan)
    if draw is not None:
        from moeify.planner.draw import draw_plan

        draw_plan(plan, topology, draw)
        console.print(f"drew {draw}")
    console.print(f"wrote {output}")


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
