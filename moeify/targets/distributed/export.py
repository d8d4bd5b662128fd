"""torch-distributed target: one safetensors shard per rank (its experts + the dense weights), streamed."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from moeify.checkpoint.files import atomic_directory, check_writable
from moeify.checkpoint.integrity import Verifier, remember
from moeify.checkpoint.metadata import MOEIFY_FILE, WEIGHTS_STEM, read_metadata, require_weights
from moeify.checkpoint.skeleton import skeleton
from moeify.checkpoint.sources import check_safetensors, tied_aliases, weight_files
from moeify.errors import MoeifyError
from moeify.layers.switch import expert_counts
from moeify.planner.placement import balanced
from moeify.planner.plan import Estimate, LayerPlan, Mesh, ShardingPlan, id_runs
from moeify.targets.distributed.layer import ExpertGroup, expert_rows, local_expert_ids
from moeify.targets.distributed.lower import check_plan_fits, lower_expert_parallel
from moeify.targets.distributed.manifest import (
    PLAN_FILE,
    Manifest,
    RankShard,
    describe,
    write_manifest,
)

Progress = Callable[[str, int, int], None]
TARGET = "torch-distributed"


def shard_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def default_plan(layers: dict[str, int], world_size: int, *, expert_parallel: int | None = None,
                 allow_uneven: bool = False) -> ShardingPlan:
    """A plan without a topology: balanced placement, contiguous layout, no cost estimate.

    Expert-parallel size: `expert_parallel` if given, else the largest divisor of `world_size`
    that divides every layer's expert count (or `world_size` itself with `allow_uneven`, where
    ranks may hold different numbers of experts). The remaining factor is data-parallel.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise MoeifyError(f"--world-size must be a positive integer, got {world_size}")
    if not layers:
        raise MoeifyError("the model has no Switch layers: convert it with `moeify convert` first")
    even = [d for d in range(1, world_size + 1) if world_size % d == 0 and all(e % d == 0 for e in layers.values())]
    ep = expert_parallel or (world_size if allow_uneven else max(even))
    if world_size % ep:
        raise MoeifyError(f"the expert-parallel size {ep} does not divide --world-size {world_size}")
    if ep not in even and not allow_uneven:
        raise MoeifyError(f"{ep} ranks cannot hold {sorted(set(layers.values()))} experts evenly: "
                          "pass --allow-uneven, or a size that divides the expert count")
    dp = world_size // ep
    ranks = [[d * ep + e for e in range(ep)] for d in range(dp)]
    return ShardingPlan(
        mesh=Mesh(ranks=ranks), layout="contiguous",
        layers=[LayerPlan(name=n, num_experts=e, placement=balanced(e, ep), all_to_all="flat")
                for n, e in layers.items()],
        # Zeros mean "not estimated": no topology was given, so no cost model ran.
        estimate=Estimate(step_ms=0.0, all_to_all_ms=0.0, lower_bound_ms=0.0, compute_ms=0.0, allreduce_ms=0.0,
                          memory_per_rank_bytes=0, memory_limit_bytes=0),
        model={"estimated": False, "how": f"default plan for --world-size {world_size}: balanced placement, "
               "no topology, no cost estimate (make a costed one with `moeify plan`)"},
        topology={"name": "none (not estimated)"})


def rank_part(structure: nn.Module, plan: ShardingPlan, rank: int) -> nn.Module:
    """`structure` (not modified) lowered to `rank`'s part, for structure work (no process group)."""
    members = next(g for g in plan.expert_parallel_groups if rank in g)
    return lower_expert_parallel(copy.deepcopy(structure), plan, ExpertGroup(members.index(rank), len(members)))


@dataclass
class DistributedExport:
    path: Path
    plan: ShardingPlan
    manifest: Manifest


def export_distributed(source: str | Path, output: str | Path, plan: ShardingPlan | str | Path | None = None, *,
                       world_size: int | None = None, allow_uneven: bool = False, force: bool = False,
                       progress: Progress | None = None, model: nn.Module | None = None,
                       verify: bool = True) -> DistributedExport:
    """Write `source` (a `moeify convert` output) as one shard per rank of `plan`.

    Give `plan` (a ShardingPlan or a plan.json) or `world_size` (a default plan). Streams: the
    structure is built on meta, and each shard is read from the source, written, and freed
    before the next, so memory peaks near one shard plus the dense weights. `verify` first checks
    the source's files against its moeify-manifest.json.
    """
    source, output = Path(source), Path(output)
    if (plan is None) == (world_size is None):
        raise MoeifyError("give exactly one of --plan and --world-size")
    check_writable(output, force)
    meta = read_metadata(source)
    require_weights(source, meta, "exporting rank shards")
    if verify:  # every shard reads from every source file, so all are checked first
        Verifier(source).check_all()
    structure = skeleton(source, model)
    if plan is None:
        plan = default_plan(expert_counts(structure), world_size, allow_uneven=allow_uneven)
    elif not isinstance(plan, ShardingPlan):
        plan = ShardingPlan.load(plan)
    check_plan_fits(structure, plan)
    where = _tensor_files(source)
    shards = []
    # manifest.json lists every file with its sha256 and size already: no moeify-manifest.json beside it.
    with atomic_directory(output, force=force, manifest=False) as tmp:
        for rank in range(plan.world_size):
            part = rank_part(structure, plan, rank)
            name = shard_name(rank, plan.world_size)
            _write_shard(part, where, tmp / name, {"rank": str(rank), "world_size": str(plan.world_size)})
            remember(tmp / name)  # hashed now, while its pages are cached, not after the later shards
            shards.append(RankShard(rank, name, local_expert_ids(part)))
            if progress:
                progress("emit", rank + 1, plan.world_size)
        (tmp / MOEIFY_FILE).write_text(json.dumps({**meta, "target": TARGET}, indent=2))
        plan.save(tmp / PLAN_FILE)
        names = [MOEIFY_FILE, PLAN_FILE] + [s.file for s in shards]
        manifest = Manifest(world_size=plan.world_size, files=describe(tmp, names), ranks=shards,
                            source=meta["source"])
        write_manifest(tmp, manifest)
    return DistributedExport(output, plan, manifest)


def _tensor_files(source: Path) -> dict[str, Path]:
    """Which source safetensors file holds each tensor (headers only)."""
    from safetensors import safe_open

    where = {}
    for f in weight_files(source, WEIGHTS_STEM):
        check_safetensors(f)
        with safe_open(str(f), "pt") as handle:
            where.update(dict.fromkeys(handle.keys(), f))
    return where


def _write_shard(part: nn.Module, where: dict[str, Path], out: Path, metadata: dict[str, str]) -> None:
    """Read exactly `part`'s tensors from the source (expert stacks: only its rows), write, free."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    experts = expert_rows(part)
    aliases = tied_aliases(part)
    wanted = {k: t for k, t in part.state_dict().items() if k not in aliases}
    tensors = {}
    for name, like in wanted.items():
        if name not in where:
            raise MoeifyError(f"the source weights lack {name}: the directory does not match its moeify.json")
        # One open per tensor: the source's mapped pages count as resident while the file is open,
        # so closing it after each read keeps the peak near the shard being built, not twice it.
        with safe_open(str(where[name]), "pt") as f:
            t = _rows(f, name, experts[name], like) if name in experts else f.get_tensor(name)
        if tuple(t.shape) != tuple(like.shape):
            raise MoeifyError(f"the source's {name} has shape {tuple(t.shape)}, the model expects "
                              f"{tuple(like.shape)}: the directory does not match its moeify.json")
        tensors[name] = t
    save_file(tensors, str(out), metadata={"format": "pt", **metadata})


def _rows(f, name: str, ids: list[int], like: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a stacked expert tensor, read as runs of consecutive ids (never the whole stack)."""
    runs = id_runs(ids)
    if not runs:
        return torch.empty(like.shape, dtype=like.dtype)
    view = f.get_slice(name)
    parts = [view[a:b] for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts)  # no second copy for a contiguous block
