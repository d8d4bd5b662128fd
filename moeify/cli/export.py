"""`moeify export`: a converted model -> one of the registry's targets (ONNX, rank shards, transformers checkpoints)."""
from __future__ import annotations

import importlib
from pathlib import Path

import click
from click.core import ParameterSource

from moeify.checkpoint.files import check_not_inside
from moeify.checkpoint.hf_switch import DEFAULT_SEQ_LEN
from moeify.cli.common import check_output_parent, verify_option
from moeify.cli.targets import TARGETS, targets_help
from moeify.errors import MoeifyError

# The choices of moeify.targets.onnx.options, spelled out so that building the CLI does not import
# onnx (the package's __init__ does); tests/test_startup.py checks that they match.
MODES = ("fused", "portable")
DTYPES = ("fp32", "fp16")
PROVIDERS = ("cpu", "cuda")
QUANTIZE = ("int8", "int4")

HELP = """Export the converted model at SOURCE (a `moeify convert` output).

\b
Examples:
  moeify export out/switch-t5-small --target onnx -o out/onnx  # fused
  moeify export out/switch-t5-small --target onnx --mode portable \\
      -o out/onnx-portable
  moeify export out/switch-t5-small --target onnx --quantize int4 \\
      -o out/onnx-int4   # QMoE: 4-bit experts
  moeify inspect out/onnx/encoder_model.onnx   # ops, MoE nodes, sizes
  moeify export out/switch-t5-small --target torch-distributed \\
      --world-size 4 -o out/dist4   # then: moeify run out/dist4
  moeify export out/switch-t5-small --target hf-switch -o out/hf
  moeify export out/moe-llama --target hf-mixtral -o out/mixtral

onnx: encoder-decoder models give encoder_model.onnx and decoder_model.onnx, other models
model.onnx; batch and sequence axes are dynamic. Fused mode (the default) is DROPLESS:
com.microsoft.MoE keeps every token, so it equals PyTorch only where the eval capacity
drops none; portable mode reproduces the capacity. --quantize int8|int4 writes the experts
as com.microsoft.QMoE (fused mode only, dropless too).

torch-distributed: one safetensors file per rank (the dense weights and that rank's
experts), the plan and a sha256 manifest, written one shard at a time. Run it with
`moeify run DIR` or `torchrun --nproc-per-node N -m moeify.run DIR`.

hf-*: a directory that transformers' from_pretrained loads (config.json, safetensors in the
hub layout, the tokenizer if the source had one). Every tensor's name, shape and dtype is
checked against the transformers class, built on the meta device, before anything is
written. What the family cannot express is refused with the flags to convert with.

""" + targets_help(76)


@click.command("export", help=HELP, short_help="Export to ONNX, rank shards or a transformers checkpoint.")
@verify_option
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(list(TARGETS)), required=True,
              help="What to export to (the list below says what each accepts).")
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
@click.option("--check/--no-check", default=True, show_default=True,
              help="onnx: run each graph in onnxruntime and PyTorch on a sample batch and report the difference.")
@click.option("--quantize", type=click.Choice(QUANTIZE), default=None,
              help="onnx, fused mode: int8 or int4 expert weights (symmetric, per output channel) in "
                   "com.microsoft.QMoE nodes, dropless like MoE; routers and dense layers stay float.")
@click.option("--with-past", is_flag=True,
              help="onnx: a KV cache in optimum's with-past layout (T5: decoder_model.onnx also returns "
                   "present.*, decoder_with_past_model.onnx takes past_key_values.*; decoder-only: model.onnx "
                   "takes and returns them).")
@click.option("--plan", type=click.Path(path_type=Path), default=None,
              help="torch-distributed: a `moeify plan` JSON that places the experts.")
@click.option("--world-size", type=int, default=None,
              help="torch-distributed, instead of --plan: a default plan over this many ranks (expert parallel "
                   "as wide as the experts allow, balanced placement, not estimated).")
@click.option("--allow-uneven", is_flag=True,
              help="torch-distributed with --world-size: let ranks hold different numbers of experts.")
@click.option("--seq-len", type=int, default=DEFAULT_SEQ_LEN, show_default=True,
              help="hf-switch: the sequence length its per-sequence expert_capacity is sized for "
                   "(from the eval capacity factor).")
@click.option("--dynamo", is_flag=True,
              help="Capture with torch.export (needs onnxscript) instead of the TorchScript exporter. "
                   "T5 does not export this way with torch 2.13.")
@click.pass_context
def export_cmd(ctx: click.Context, source: Path, target: str, output: Path | None, force: bool, **flags) -> None:
    chosen = TARGETS[target]
    for name in flags:
        if name not in chosen.options and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE:
            owner = next(t.name for t in TARGETS.values() if name in t.options)
            raise MoeifyError(f"--{name.replace('_', '-')} is an option of --target {owner}, not {target}")
    output = output or source.with_name(f"{source.name}-{target}")
    check_not_inside(output, source)
    check_output_parent(output)  # a folder that cannot be made fails before the model loads
    check_fits(source, output, target, {name: flags[name] for name in chosen.options})
    module, function = chosen.runner.split(":")
    run = getattr(importlib.import_module(module), function)
    run(chosen, source, output, force, {name: flags[name] for name in chosen.options})


# Bytes per expert weight in a --quantize int8|int4 graph (com.microsoft.QMoE; scales are left out).
QUANTIZED_BYTES = {"int8": 1.0, "int4": 0.5}


def check_fits(source: Path, output: Path, target: str, flags: dict) -> None:
    """Refuse, before the model loads, an export this machine cannot hold: the loaded model (and for onnx the
    graph's initializers beside it) in memory, and the files on the disk under `output`. torch-distributed checks
    its own disk (every shard holds the dense weights), and a structure-only source its own refusal."""
    from moeify.checkpoint.metadata import read_metadata
    from moeify.planner.resources import check_memory, free_disk, size, weight_bytes

    meta = read_metadata(source)
    if not meta["weights"]:
        return
    summary = meta["summary"]
    weights = weight_bytes(summary)
    written = weights
    if target == "onnx":
        width = 2 if flags["dtype"] == "fp16" else 4
        experts = summary["total_params"] - summary["dense_params"]
        written = int(summary["dense_params"] * width + experts * QUANTIZED_BYTES.get(flags["quantize"], width))
        written *= 2 if flags["save_optimized"] else 1
    # torch-distributed streams one shard at a time (the dense weights are in each); onnx keeps the graph's
    # initializers beside the model they were traced from.
    held = {"torch-distributed": (weight_bytes(summary, "dense_params"), "the dense weights"),
            "onnx": (weights + written, "the model and its graph")}.get(target, (weights, "the model"))
    check_memory(held[0], f"--target {target} needs at least {{}} for {held[1]}",
                 "export on a machine with more memory")
    free = free_disk(output)
    if target != "torch-distributed" and free is not None and written > free[0]:
        raise MoeifyError(f"--target {target} writes at least {size(written)}, {size(free[0])} is free under "
                          f"{free[1]}: export to another disk with -o, or free space")
