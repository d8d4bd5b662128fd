"""`moeify export --target onnx`: export, then show node counts, MoE nodes and the parity check."""
from __future__ import annotations

import time
from pathlib import Path

from moeify.cli.common import console, table


def export_onnx_target(source: Path, output: Path, force: bool, flags: dict) -> None:
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
    console.print(f"{source} -> {output}: {options.mode} mode, {options.dtype}, opset {options.opset}, {route}, "
                  f"{time.perf_counter() - t0:.1f}s")
    for g in report.graphs:
        t.add_row(g.file, str(g.nodes_exported), str(g.nodes),
                  "-" if g.nodes_optimized is None else str(g.nodes_optimized), str(g.moe_nodes),
                  f"{g.megabytes:.2f}", "-" if g.max_abs_diff is None else f"{g.max_abs_diff:.1e}")
    console.print(t)
    fused = sum(p.lowering == "fused" for p in report.layers)
    if options.mode == "fused":
        console.print(f"{fused} Switch layers fused into com.microsoft.MoE (dropless: every token is kept), "
                      f"{len(report.layers) - fused} portable (exact eval capacity)")
        for plan in report.fallbacks:
            console.print(f"[yellow]portable fallback[/] {plan.spec.name}: {plan.reason}")
    else:
        console.print(f"{len(report.layers)} Switch layers lowered to standard ONNX ops (exact eval capacity)")
    if options.verify:
        reference = "PyTorch eval, dropless for fused layers" if fused else "PyTorch eval"
        console.print(f"[dim]max |Δ|: onnxruntime vs {reference}, batch 3 x 11 tokens[/]")
    if options.save_optimized:
        console.print(f"[dim]*_optimized.onnx are optimised for this machine and --provider {options.provider}[/]")
