"""Model summary: parameter counts and Switch layers of a converted model (works on meta)."""
from __future__ import annotations

from torch import nn

from moeify.checkpoint.records import ModelSummary, SwitchLayerRecord
from moeify.conversion.report import InitReport
from moeify.layers.switch import SwitchFFN, switch_layers


def describe_activation(activation: nn.Module) -> str:
    text = repr(activation)
    return text if len(text) < 60 else type(activation).__name__


def layer_record(name: str, layer: SwitchFFN, init_report: InitReport | None = None) -> SwitchLayerRecord:
    """The record of one live Switch layer (a rank's part holds only some of its experts), with what
    its calibrated initialisation measured, if any."""
    ex = layer.experts
    return SwitchLayerRecord(
        name=name, d_model=ex.d_model, d_ff=ex.d_ff, gated=ex.gated, bias=ex.b_in is not None,
        activation=describe_activation(ex.act), routing=layer.routing,
        # Each stacked parameter is (experts, ...): one expert's share is its shape past dim 0.
        params_per_expert=sum(p.shape[1:].numel() for p in ex.parameters()),
        experts_held=ex.num_experts, router_params=sum(p.numel() for p in layer.router.parameters()),
        init_report=init_report)


def summarize(model: nn.Module) -> ModelSummary:
    params = dict(model.named_parameters())  # de-duplicates tied weights
    total = sum(p.numel() for p in params.values())
    record = getattr(model, "moeify_record", None)
    reports = getattr(record, "init_reports", {})
    layers = [layer_record(name, m, reports.get(name)) for name, m in switch_layers(model).items()]
    held = sum(s.expert_params for s in layers)
    first = next(iter(params.values()), None)
    ffn_layers = len(record.sites) + len(record.skipped) if record is not None else len(layers)
    return ModelSummary(
        model=type(model).__name__, dtype=str(first.dtype).removeprefix("torch.") if first is not None else "-",
        # Per token: everything outside the experts, plus the k experts each Switch layer runs.
        total_params=total, active_params=total - held + sum(s.params_per_expert * s.routing.top_k for s in layers),
        dense_params=total - held, num_experts=max((s.num_experts for s in layers), default=0),
        moe_layers=layers, ffn_layers=ffn_layers)
