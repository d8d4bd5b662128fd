"""Model summary: parameter counts and Switch layers of a converted model (works on meta)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from moeify.layers import SwitchFFN


@dataclass
class LayerSummary:
    name: str
    num_experts: int
    d_model: int
    d_ff: int
    gated: bool
    bias: bool
    capacity_factor: float
    eval_capacity_factor: float
    expert_params: int  # all experts of this layer
    router_params: int


@dataclass
class ModelSummary:
    """What `moeify inspect` shows; the planner reads the same numbers."""

    model: str
    dtype: str
    total_params: int
    active_params: int  # per token: dense params + router + one expert per Switch layer
    dense_params: int  # everything outside the experts
    num_experts: int  # experts per Switch layer (the largest, if layers differ)
    moe_layers: list[LayerSummary] = field(default_factory=list)
    ffn_layers: int = 0  # FFNs found, converted or not: the transformer depth, for activation memory

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(model: nn.Module) -> ModelSummary:
    params = dict(model.named_parameters())  # de-duplicates tied weights
    total = sum(p.numel() for p in params.values())
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, SwitchFFN):
            ex = m.experts
            layers.append(LayerSummary(
                name=name, num_experts=m.num_experts, d_model=ex.d_model, d_ff=ex.d_ff, gated=ex.gated,
                bias=ex.b_in is not None, capacity_factor=m.routing.capacity_factor,
                eval_capacity_factor=m.routing.eval_capacity_factor,
                expert_params=sum(p.numel() for p in ex.parameters()),
                router_params=sum(p.numel() for p in m.router.parameters())))
    expert_total = sum(s.expert_params for s in layers)
    active = total - sum(s.expert_params - s.expert_params // s.num_experts for s in layers)
    first = next(iter(params.values()), None)
    record = getattr(model, "moeify_record", None)
    ffn_layers = len(record.sites) + len(record.skipped) if record is not None else len(layers)
    return ModelSummary(
        model=type(model).__name__, dtype=str(first.dtype).removeprefix("torch.") if first is not None else "-",
        total_params=total, active_params=active, dense_params=total - expert_total,
        num_experts=max((s.num_experts for s in layers), default=0), moe_layers=layers, ffn_layers=ffn_layers)
