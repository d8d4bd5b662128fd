"""`moeify export --target onnx`: export, then show node counts, MoE nodes and the parity check."""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from moeify.cli.common import console, table
from moeify.cli.targets import Target

if TYPE_CHECKING:
    from moeify.targets.onnx.unit import LayerLowering


def export_onnx_target(target: Target, source: Path, output: Path, force: bool, flags: dict) -> None:
    from moeify.cli.progress import progress_bars
    from moeify.targets.onnx import OnnxOptions, export_onnx

    options = OnnxOptions(**flags)
    t0 = time.perf_counter()
    with progress_bars(console) as progress:
        report = export_onnx(source, output, options, force=force, progress=progress)
    route = "torch.export" if options.dynamo else "TorchScript exporter"
    t = table("graph", ("nodes\nexported", "right"), ("nodes\nsaved", "right"),
              (f"optimised\n({options.provider})", "right"), ("MoE\nnodes", "right"), ("MiB", "right"),
              ("max |Δ| vs\nPyTorch", "right"))
    weights = f"{options.dtype}, {options.quantize} experts" if options.quantize else options.dtype
    console.print(f"{source} -> {output}: {options.mode} mode, {weights}, opset {options.opset}, {route}, "
                  f"{time.perf_counter() - t0:.1f}s")
    for g in report.graphs:
        t.add_row(g.file, str(g.nodes_exported), str(g.nodes),
                  "-" if g.nodes_optimized is None else str(g.nodes_optimized), str(g.moe_nodes),
                  f"{g.megabytes:.2f}", "-" if g.max_abs_diff is None else f"{g.max_abs_diff:.1e}")
    console.print(t)
    fused = [p for p in report.layers if p.lowering in ("fused", "qmoe")]
    portable = [p for p in report.layers if p.lowering == "portable"]
    if options.quantize:
        console.print(f"{len(fused)} Switch layers as com.microsoft.QMoE with {options.quantize} experts "
                      f"({_routes(fused)}dropless: every token is kept), {len(portable)} portable in float "
                      f"({_routes(portable)}{_capacity(portable)})")
        for plan in report.fallbacks:
            console.print(f"[yellow]portable fallback[/] {plan.spec.name}: {plan.reason}")
    elif options.mode == "fused":
        console.print(f"{len(fused)} Switch layers fused into com.microsoft.MoE ({_routes(fused)}dropless: every "
                      f"token is kept), {len(portable)} portable ({_routes(portable)}{_capacity(portable)})")
        for plan in report.fallbacks:
            console.print(f"[yellow]portable fallback[/] {plan.spec.name}: {plan.reason}")
    else:
        console.print(f"{len(portable)} Switch layers lowered to standard ONNX ops "
                      f"({_routes(portable)}{_capacity(portable)})")
    if options.check:
        reference = "PyTorch eval, dropless for fused layers" if fused else "PyTorch eval"
        if options.quantize:
            reference += " and with the graph's dequantized expert weights"
        console.print(f"[dim]max |Δ|: onnxruntime vs {reference}, batch 3 x 11 tokens[/]")
        if options.quantize:
            errors = ", ".join(f"{g.file} {g.max_abs_diff_float:.1e}" for g in report.graphs)
            console.print(f"quantization error, max |Δ| vs the float model: {errors}")
    if options.save_optimized:
        console.print(f"[dim]*_optimized.onnx are optimised for this machine and --provider {options.provider}[/]")


def _routes(plans: list[LayerLowering]) -> str:
    """'top-2, ', 'top-2 norm, ' ('top-1/top-2, ' where layers differ); '' where all are Switch's top-1."""
    labels = dict.fromkeys(f"top-{p.spec.top_k}" + (" norm" if p.spec.normalize_gates else "") for p in plans)
    return "" if list(labels) in ([], ["top-1"]) else "/".join(labels) + ", "


def _capacity(plans: list[LayerLowering]) -> str:
    """What portable layers keep: the exact eval capacity, or every assignment where they are dropless."""
    dropless = {p.spec.dropless for p in plans}
    if dropless == {True}:
        return "dropless"
    return "exact eval capacity, or dropless" if True in dropless else "exact eval capacity"
