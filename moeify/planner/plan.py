"""ShardingPlan: plain data with a versioned JSON form; the runtime and targets consume it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeify.checkpoint.files import read_json, write_text_atomically
from moeify.errors import MoeifyError

SCHEMA = "moeify.plan"
VERSION = 1


@dataclass
class Mesh:
    shape: list[int]  # [data_parallel, expert_parallel]
    dim_names: list[str]  # ["dp", "ep"]
    ranks: list[list[int]]  # ranks[d][e]: the global rank at mesh position (d, e)


@dataclass
class LayerPlan:
    name: str
    num_experts: int
    placement: list[int]  # expert id -> rank within its expert-parallel group (its home copy)
    all_to_all: str  # "flat" or "hierarchical"
    replicas: dict[str, list[int]] = field(default_factory=dict)  # expert id -> group ranks holding it, home too
    all_to_all_ms: float = 0.0  # the layer's four exchanges (dispatch and combine, forward and backward)
    lower_bound_ms: float = 0.0
    compute_ms: float = 0.0


@dataclass
class Estimate:
    step_ms: float  # compute + all-to-all + gradient all-reduce, not overlapped
    all_to_all_ms: float
    lower_bound_ms: float  # of the all-to-all time: no schedule on this topology beats it
    compute_ms: float
    allreduce_ms: float
    memory_per_rank_bytes: int
    memory_limit_bytes: int
    busiest_link: list[str] = field(default_factory=list)


@dataclass
class ShardingPlan:
    world_size: int
    mesh: Mesh
    layout: str  # "contiguous": expert-parallel groups are consecutive ranks; "strided"
    expert_parallel_groups: list[list[int]]
    data_parallel_groups: list[list[int]]
    layers: list[LayerPlan]
    estimate: Estimate
    model: dict = field(default_factory=dict)  # what was planned: name, dtype, tokens per rank, ...
    topology: dict = field(default_factory=dict)  # name, hosts, gpus per host, device
    alternatives: list[dict] = field(default_factory=list)  # the next best candidates, for the record

    @property
    def expert_parallel_size(self) -> int:
        return self.mesh.shape[1]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "version": VERSION, **asdict(self)}

    def save(self, path: str | Path) -> None:
        write_text_atomically(path, json.dumps(self.to_dict(), indent=1))  # never a half-written plan

    @classmethod
    def from_dict(cls, data: dict) -> "ShardingPlan":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise MoeifyError('not a moeify sharding plan (no "schema": "moeify.plan"): make one with `moeify plan`')
        if data.get("version") != VERSION:
            raise MoeifyError(f"plan version {data.get('version')} is not {VERSION}: re-run `moeify plan`")
        try:
            plan = cls(
                world_size=data["world_size"], mesh=Mesh(**data["mesh"]), layout=data["layout"],
                expert_parallel_groups=data["expert_parallel_groups"],
                data_parallel_groups=data["data_parallel_groups"],
                layers=[LayerPlan(**layer) for layer in data["layers"]], estimate=Estimate(**data["estimate"]),
                model=data.get("model", {}), topology=data.get("topology", {}),
                alternatives=data.get("alternatives", []))
        except (KeyError, TypeError) as e:
            raise MoeifyError(f"the plan is incomplete or malformed ({e}): re-run `moeify plan`") from None
        plan.check()
        return plan

    @classmethod
    def load(cls, path: str | Path) -> "ShardingPlan":
        return cls.from_dict(read_json(path, what="plan", fix=f"make one with `moeify plan ... -o {path}`"))

    def check(self) -> None:
        """Internal consistency: every rank once per group kind, placements inside the groups."""
        ranks = sorted(r for g in self.expert_parallel_groups for r in g)
        if ranks != list(range(self.world_size)) or \
                sorted(r for g in self.data_parallel_groups for r in g) != ranks:
            raise MoeifyError("the plan's groups do not cover every rank exactly once: re-run `moeify plan`")
        ep = self.expert_parallel_size
        for layer in self.layers:
            if len(layer.placement) != layer.num_experts or not all(0 <= r < ep for r in layer.placement):
                raise MoeifyError(f"the plan places {layer.name}'s experts outside its groups: re-run `moeify plan`")


def id_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Ascending ids as half-open runs of consecutive ids: [0, 1, 2, 5] -> [(0, 3), (5, 6)]."""
    runs: list[list[int]] = []
    for e in ids:
        if runs and runs[-1][1] == e:
            runs[-1][1] = e + 1
        else:
            runs.append([e, e + 1])
    return [(a, b) for a, b in runs]


def expert_ranges(experts: list[int]) -> str:
    """[0, 1, 2, 5] -> 'E0-2,5'."""
    if not experts:
        return "-"
    return "E" + ",".join(f"{a}" if b == a + 1 else f"{a}-{b - 1}" for a, b in id_runs(experts))
