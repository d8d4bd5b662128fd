"""`moeify export`: a converted model -> ONNX for onnxruntime, or per-rank shards for torch.distributed."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import click
from click.core import ParameterSource

from moeify.cli.export_distributed import export_distributed_target
from moeify.cli.export_onnx import export_onnx_target
from moeify.errors import MoeifyError

# The choices of moeify.targets.onnx.options, spelled out so that building the CLI does not import
# onnx (the package's __init__ does); tests/test_startup.py checks that they match.
MODES = ("fused", "portable")
DTYPES = ("fp32", "fp16")
PROVIDERS = ("cpu", "cuda")

# One entry per target: the function, taking (source, output, force, its flags), and its options.
TARGETS: dict[str, tuple[Callable[[Path, Path, bool, dict], None], tuple[str, ...]]] = {
    "onnx": (export_onnx_target, ("mode", "opset", "dtype", "provider", "optimize", "save_optimized", "verify",
                                  "dynamo")),
    "torch-distributed": (export_distributed_target, ("plan", "world_size", "allow_uneven")),
}


@click.command("export", short_help="Export to ONNX, or to per-rank shards for torch.distributed.")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(sorted(TARGETS)), required=True, help="What to export to.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: SOURCE-TARGET].")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--mode", type=click.Choice(MODES), default="fused", show_default=True,
              help="fused: one com.microsoft.MoE node per Switch layer. It is DROPLESS: it keeps every "
                   "token, as PyTorch does when the capacity drops none; layers it cannot express stay "
                   "portable, and the command says which. portable: standard ONNX ops only, with "
                   "PyTorch's exact eval capacity (dropped tokens give 0).")
@click.option("--opset", type=int, default=None,
              help="ONNX opset: 17-20, or 18-23 with --dynamo [default: 17, 18 with --dynamo].")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="fp16 halves weights and activations; routers still compute in float32.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True,
              help="onnxruntime execution provider for optimisation and the check; cuda needs the gpu "
                   "extra (onnxruntime-gpu).")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Run onnxruntime's graph optimisations and report node counts.")
@click.option("--save-optimized", is_flag=True,
              help="Also write <graph>_optimized.onnx, optimised for this machine and provider.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run each graph in onnxruntime and PyTorch on a sample batch and report the difference.")
@click.option("--plan", type=click.Path(path_type=Path), default=None,
              help="torch-distributed: a `moeify plan` JSON that places the experts.")
@click.option("--world-size", type=int, default=None,
              help="torch-distributed, instead of --plan: a default plan over this many ranks (expert parallel "
                   "as wide as the experts allow, balanced placement, not estimated).")
@click.option("--allow-uneven", is_flag=True,
              help="torch-distributed with --world-size: let ranks hold different numbers of experts.")
@click.option("--dynamo", is_flag=True,
              help="Capture with torch.export (needs onnxscript) instead of the TorchScript exporter. "
                   "T5 does not export this way with torch 2.13.")
@click.pass_context
def export_cmd(ctx: click.Context, source: Path, target: str, output: Path | None, force: bool, **flags) -> None:
    """Export the converted model at SOURCE (a `moeify convert` output) for serving or for
    expert-parallel training.

    onnx: encoder-decoder models give encoder_model.onnx (input_ids, attention_mask ->
    last_hidden_state) and decoder_model.onnx (input_ids, encoder_hidden_states,
    encoder_attention_mask -> logits); other models give model.onnx. Batch and sequence axes
    are dynamic. Dropout is removed, constants folded, every graph passes onnx's full check.

    Fused mode (the default) is DROPLESS: com.microsoft.MoE keeps every token, so it equals
    PyTorch only where the eval capacity drops none. Portable mode reproduces the capacity.

    \b
    Examples:
      moeify export out/switch-t5-small --target onnx -o out/onnx  # fused
      moeify export out/switch-t5-small --target onnx --mode portable \\
          -o out/onnx-portable
      moeify export out/switch-t5-small --target onnx --dtype fp16 \\
          --save-optimized -o out/onnx16
      moeify inspect out/onnx/encoder_model.onnx   # ops, MoE nodes, sizes

    torch-distributed: one safetensors file per rank (the dense weights and that rank's experts),
    the plan and a manifest with sha256, written one shard at a time. Run it with
    `moeify run DIR` or `torchrun --nproc-per-node N -m moeify.run DIR`.

    \b
      moeify export out/switch-t5-small --target torch-distributed \\
          --plan plan.json -o out/dist
      moeify export out/switch-t5-small --target torch-distributed \\
          --world-size 4 -o out/dist4
    """
    run, names = TARGETS[target]
    for name, value in flags.items():
        if name not in names and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            owner = next(t for t, (_, n) in TARGETS.items() if name in n)
            raise MoeifyError(f"--{name.replace('_', '-')} is an option of --target {owner}, not {target}")
    output = output or source.with_name(f"{source.name}-{target}")
    run(source, output, force, {name: flags[name] for name in names})
