"""ShardingPlan: plain data with a versioned JSON form; the runtime and targets consume it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeify.checkpoint.files import read_json, write_text_atomically
from moeify.checkpoint.schemas import PLAN_SCHEMA as SCHEMA
from moeify.checkpoint.schemas import PLAN_VERSION as VERSION  # still 1: the file keeps the derived fields
from moeify.checkpoint.schemas import validate
from moeify.errors import MoeifyError

MESH_DIMS = ("dp", "ep")


@dataclass
class Mesh:
    """The [dp, ep] rank grid, the one place a plan keeps its groups: ranks[d][e] is the global rank
    at mesh position (d, e). An expert-parallel group is a row, a data-parallel group a column."""

    ranks: list[list[int]]

    @property
    def shape(self) -> list[int]:  # [data_parallel, expert_parallel]
        return [len(self.ranks), len(self.ranks[0]) if self.ranks else 0]

    @property
    def dim_names(self) -> list[str]:
        return list(MESH_DIMS)

    @property
    def rows(self) -> list[list[int]]:
        return [list(row) for row in self.ranks]

    @property
    def columns(self) -> list[list[int]]:
        return [list(col) for col in zip(*self.ranks)]

    def to_dict(self) -> dict:
        return {"shape": self.shape, "dim_names": self.dim_names, "ranks": self.rows}


def check_grid(ranks, world_size: int | None = None, what: str = "mesh ranks") -> None:
    """A rank grid is a non-empty rectangle of ints holding each rank 0..N-1 exactly once (N: its
    size, or `world_size`); else one line that says what is wrong and the fix."""
    if not isinstance(ranks, list) or not ranks or \
            not all(isinstance(row, list) and row and all(type(r) is int for r in row) for row in ranks):
        raise MoeifyError(f"the plan's {what} are not a [dp, ep] grid of integer ranks: re-run `moeify plan`")
    flat = sorted(r for row in ranks for r in row)
    size = len(flat) if world_size is None else world_size
    if flat != list(range(size)):
        raise MoeifyError(f"the plan's {what} do not cover every rank exactly once (ranks 0 to {size - 1}): "
                          "re-run `moeify plan`")
    widths = sorted({len(row) for row in ranks})
    if len(widths) > 1:
        raise MoeifyError(f"the plan's {what} are ragged (rows of {' and '.join(map(str, widths))} ranks), "
                          "not a [dp, ep] grid: re-run `moeify plan`")


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
    mesh: Mesh  # the rank grid; world size, shape and both group kinds are derived from it
    layout: str  # "contiguous": expert-parallel groups are consecutive ranks; "strided"
    layers: list[LayerPlan]
    estimate: Estimate
    model: dict = field(default_factory=dict)  # what was planned: name, dtype, tokens per rank, ...
    topology: dict = field(default_factory=dict)  # name, hosts, gpus per host, device
    alternatives: list[dict] = field(default_factory=list)  # the next best candidates, for the record

    @property
    def world_size(self) -> int:
        return sum(len(row) for row in self.mesh.ranks)

    @property
    def expert_parallel_size(self) -> int:
        return self.mesh.shape[1]

    @property
    def expert_parallel_groups(self) -> list[list[int]]:
        """The mesh rows: the ranks that exchange tokens. Assigning groups sets the rows."""
        return self.mesh.rows

    @expert_parallel_groups.setter
    def expert_parallel_groups(self, groups: list[list[int]]) -> None:
        self.mesh.ranks = [list(g) for g in groups]

    @property
    def data_parallel_groups(self) -> list[list[int]]:
        """The mesh columns: the ranks holding the same experts. Assigning groups sets the columns."""
        return self.mesh.columns

    @data_parallel_groups.setter
    def data_parallel_groups(self, groups: list[list[int]]) -> None:
        self.mesh.ranks = [list(row) for row in zip(*groups)]

    def to_dict(self) -> dict:
        """The file keeps the derived fields (world_size, mesh shape, both group lists) for readers."""
        d = asdict(self)
        return {"schema": SCHEMA, "version": VERSION, "world_size": self.world_size, "mesh": self.mesh.to_dict(),
                "layout": d["layout"], "expert_parallel_groups": self.expert_parallel_groups,
                "data_parallel_groups": self.data_parallel_groups, "layers": d["layers"], "estimate": d["estimate"],
                "model": d["model"], "topology": d["topology"], "alternatives": d["alternatives"]}

    def save(self, path: str | Path) -> None:
        write_text_atomically(path, json.dumps(self.to_dict(), indent=1))  # never a half-written plan

    @classmethod
    def from_dict(cls, data: dict) -> "ShardingPlan":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise MoeifyError('not a moeify sharding plan (no "schema": "moeify.plan"): make one with `moeify plan`')
        if data.get("version") != VERSION:
            raise MoeifyError(f"plan version {data.get('version')} is not {VERSION}: re-run `moeify plan`")
        try:
            check_grid(data["mesh"]["ranks"])
            plan = cls(
                mesh=Mesh(ranks=data["mesh"]["ranks"]), layout=data["layout"],
                layers=[LayerPlan(**layer) for layer in data["layers"]], estimate=Estimate(**data["estimate"]),
                model=data.get("model", {}), topology=data.get("topology", {}),
                alternatives=data.get("alternatives", []))
        except (KeyError, TypeError) as e:
            raise MoeifyError(f"the plan is incomplete or malformed ({e}): re-run `moeify plan`") from None
        plan._check_derived(data)
        plan.check()
        return plan

    def _check_derived(self, data: dict) -> None:
        """The file's copies of what the grid implies must say the same (a hand edit may not)."""
        for key in ("expert_parallel_groups", "data_parallel_groups"):
            if key in data:
                check_grid(data[key], self.world_size, what=key)
        mesh = data["mesh"]
        for key, stored, derived in (("world_size", data.get("world_size"), self.world_size),
                                     ("mesh shape", mesh.get("shape"), self.mesh.shape),
                                     ("mesh dim_names", mesh.get("dim_names"), self.mesh.dim_names),
                                     ("expert_parallel_groups", data.get("expert_parallel_groups"),
                                      self.expert_parallel_groups),
                                     ("data_parallel_groups", data.get("data_parallel_groups"),
                                      self.data_parallel_groups)):
            if stored is not None and stored != derived:
                raise MoeifyError(f"the plan's {key} contradicts its mesh ranks, which define it: "
                                  "re-run `moeify plan`")

    @classmethod
    def load(cls, path: str | Path) -> "ShardingPlan":
        """A plan file: its schema checked (checkpoint/schemas.py) before from_dict's checks of the grid."""
        data = read_json(path, what="plan", fix=f"make one with `moeify plan ... -o {path}`")
        return cls.from_dict(validate("plan.json", data, path))

    def check(self) -> None:
        """Internal consistency: a rank grid holding every rank once, placements inside the groups."""
        check_grid(self.mesh.ranks)
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
