"""The planner's view of a model: Switch layers, bytes and tokens, read from a model summary."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeify.checkpoint.files import read_json
from moeify.errors import MoeifyError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class LayerWork:
    """One Switch layer as the planner sees it."""

    name: str
    num_experts: int
    d_model: int
    d_ff: int
    gated: bool
    expert_params: int  # one expert
    load: tuple[float, ...] | None = None  # fraction of tokens per expert, from calibration

    @property
    def flops_per_token(self) -> int:
        """Forward FLOPs of one expert on one token: 2 per multiply-add, 2 or 3 matrices."""
        return 2 * (3 if self.gated else 2) * self.d_model * self.d_ff

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
    capacity_factor: float = 1.25
    top_k: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise MoeifyError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.tokens_per_rank < 1:
            raise MoeifyError(f"--tokens-per-rank must be >= 1, got {self.tokens_per_rank}")
        if not self.layers:
            raise MoeifyError(f"{self.model} has no Switch layers to place: convert it first")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def d_model(self) -> int:
        return self.layers[0].d_model


def workload_from_summary(summary: dict, *, dtype: str = "bfloat16", tokens_per_rank: int = 8192,
                          capacity_factor: float | None = None,
                          load: dict[str, list[float]] | None = None) -> Workload:
    """Build a Workload from a ModelSummary dict (moeify.json["summary"] or summarize().to_dict())."""
    load = load or {}
    unknown = sorted(set(load) - {layer["name"] for layer in summary["moe_layers"]})
    if unknown:
        raise MoeifyError(f"the load file names layers this model lacks ({unknown[:2]}): "
                          "calibrate this model with `moeify calibrate`")
    layers = []
    for layer in summary["moe_layers"]:
        fractions = load.get(layer["name"])
        if fractions is not None and len(fractions) != layer["num_experts"]:
            raise MoeifyError(f"the load of {layer['name']} has {len(fractions)} experts, the model "
                              f"{layer['num_experts']}: calibrate this model again")
        layers.append(LayerWork(layer["name"], layer["num_experts"], layer["d_model"], layer["d_ff"],
                                layer["gated"], layer["expert_params"] // layer["num_experts"],
                                tuple(fractions) if fractions is not None else None))
    first = summary["moe_layers"][0] if summary["moe_layers"] else {}
    return Workload(
        model=summary["model"], layers=tuple(layers), dense_params=summary["dense_params"],
        ffn_layers=summary.get("ffn_layers") or len(layers),
        dtype=dtype,
        tokens_per_rank=tokens_per_rank,
        capacity_factor=capacity_factor or first.get("capacity_factor", 1.25))


def read_load(path: str | Path) -> dict[str, list[float]]:
    """Per-layer token fractions from `moeify calibrate` output."""
    data = read_json(path, what="load file", fix="create it with `moeify calibrate`")
    try:
        return {name: [float(x) for x in entry["fraction"]] for name, entry in data["layers"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MoeifyError(f"{path} is not a `moeify calibrate` load file ({e}): create it again") from None
