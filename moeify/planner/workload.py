"""The planner's view of a model: Switch layers, bytes and tokens, read from a model summary."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeify.checkpoint.files import read_json
from moeify.checkpoint.records import ModelSummary, SwitchLayerRecord
from moeify.checkpoint.schemas import validate
from moeify.config import RoutingConfig
from moeify.errors import MoeifyError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class LayerWork:
    """One Switch layer as the planner sees it: its record, and its calibrated load if any."""

    record: SwitchLayerRecord
    load: tuple[float, ...] | None = None  # fraction of tokens per expert, from calibration

    name = property(lambda self: self.record.name)
    num_experts = property(lambda self: self.record.num_experts)
    d_model = property(lambda self: self.record.d_model)
    d_ff = property(lambda self: self.record.d_ff)
    gated = property(lambda self: self.record.gated)
    flops_per_token = property(lambda self: self.record.flops_per_token)
    expert_params = property(lambda self: self.record.params_per_expert)  # one expert

    def loads(self) -> tuple[float, ...]:
        return self.load or tuple(1.0 / self.num_experts for _ in range(self.num_experts))


@dataclass(frozen=True)
class Workload:
    """Everything the cost model needs; no torch module of the model is ever built here."""

    model: str
    layers: tuple[LayerWork, ...]
    dense_params: int  # parameters outside the experts (replicated on every rank)
    ffn_layers: int  # transformer depth, for activation memory
    dtype: str = "bfloat16"  # training precision planned for, whatever the checkpoint's dtype
    tokens_per_rank: int = 8192
    capacity_factor: float = RoutingConfig.capacity_factor
    min_capacity: int = RoutingConfig.min_capacity
    top_k: int = RoutingConfig.top_k  # experts per token: each assignment is sent, computed and returned
    dropless: bool = RoutingConfig.dropless  # no capacity: every assignment is kept

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise MoeifyError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.tokens_per_rank < 1:
            raise MoeifyError(f"--tokens-per-rank must be at least 1, got {self.tokens_per_rank}: pass the tokens "
                              "each GPU routes per step, e.g. 4096")
        if not self.layers:
            raise MoeifyError(f"{self.model} has no Switch layers to place: convert it first")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def d_model(self) -> int:
        return self.layers[0].d_model


def workload_from_summary(summary: ModelSummary, *, dtype: str = "bfloat16", tokens_per_rank: int = 8192,
                          capacity_factor: float | None = None,
                          load: dict[str, list[float]] | None = None) -> Workload:
    """Build a Workload from a ModelSummary (moeify.json's "summary", or summarize() of a model)."""
    load = load or {}
    unknown = sorted(set(load) - {layer.name for layer in summary.moe_layers})
    if unknown:
        raise MoeifyError(f"the load file names layers this model lacks ({unknown[:2]}): "
                          "calibrate this model with `moeify calibrate`")
    layers = []
    for layer in summary.moe_layers:
        fractions = load.get(layer.name)
        if fractions is not None and len(fractions) != layer.num_experts:
            raise MoeifyError(f"the load of {layer.name} has {len(fractions)} experts, the model "
                              f"{layer.num_experts}: calibrate this model again")
        layers.append(LayerWork(layer, tuple(fractions) if fractions is not None else None))
    routing = summary.moe_layers[0].routing if summary.moe_layers else RoutingConfig()
    return Workload(
        model=summary.model, layers=tuple(layers), dense_params=summary.dense_params,
        ffn_layers=summary.ffn_layers or len(layers), dtype=dtype, tokens_per_rank=tokens_per_rank,
        capacity_factor=capacity_factor or routing.capacity_factor, min_capacity=routing.min_capacity,
        top_k=routing.top_k, dropless=routing.dropless)


def read_load(path: str | Path) -> dict[str, list[float]]:
    """Per-layer token fractions from `moeify calibrate` output (its schema: checkpoint/schemas.py)."""
    data = validate("load.json", read_json(path, what="load file", fix="create it with `moeify calibrate`"), path)
    return {name: [float(x) for x in entry["fraction"]] for name, entry in data["layers"].items()}
