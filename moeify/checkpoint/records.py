"""The torch-free records of a converted model: SwitchLayerRecord per layer, ModelSummary for the whole.

moeify.json stores them, `inspect` shows them, the planner's LayerWork and the ONNX export's LayerSpec
are views of a SwitchLayerRecord, and `summarize()` builds them from a live model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moeify.config import RoutingConfig
from moeify.conversion.report import InitReport


@dataclass(frozen=True)
class SwitchLayerRecord:
    name: str  # the layer's qualified module name
    d_model: int
    d_ff: int
    gated: bool  # act(x @ w_gate.T) * (x @ w_in.T)
    bias: bool  # the input projections carry biases
    activation: str  # readable form of the activation module
    routing: RoutingConfig  # experts, capacity and router losses, as the layer runs them
    params_per_expert: int  # weights and biases of one expert
    experts_held: int  # experts whose weights this model holds (all, except in a rank's part)
    router_params: int
    init_report: InitReport | None = None  # --router-init hidden / --init moefy: measured on calibration text

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    @property
    def expert_params(self) -> int:
        """Expert parameters held by this model for the layer."""
        return self.params_per_expert * self.experts_held

    @property
    def flops_per_token(self) -> int:
        """Forward FLOPs of one expert on one token: 2 per multiply-add, 2 or 3 matrices."""
        return 2 * (3 if self.gated else 2) * self.d_model * self.d_ff

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["num_experts"], data["expert_params"] = self.num_experts, self.expert_params  # for JSON readers
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SwitchLayerRecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["routing"] = RoutingConfig(**data["routing"])
        if data.get("init_report") is not None:  # absent from files written before calibrated init
            values["init_report"] = InitReport.from_dict(data["init_report"])
        return cls(**values)


@dataclass
class ModelSummary:
    """What `moeify inspect` shows; the planner reads the same numbers."""

    model: str
    dtype: str
    total_params: int  # held by this model (a rank's part: dense weights + its experts)
    active_params: int  # per token: dense params + router + top_k experts per Switch layer
    dense_params: int  # everything outside the experts
    num_experts: int  # experts per Switch layer (the largest, if layers differ)
    moe_layers: list[SwitchLayerRecord] = field(default_factory=list)
    ffn_layers: int = 0  # FFNs found, converted or not: the transformer depth, for activation memory

    def to_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in vars(self).items() if k != "moe_layers"},
                "moe_layers": [layer.to_dict() for layer in self.moe_layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSummary":
        return cls(**{**data, "moe_layers": [SwitchLayerRecord.from_dict(d) for d in data["moe_layers"]]})
