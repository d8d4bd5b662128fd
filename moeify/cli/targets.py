"""The one registry of `moeify export --target` names: what each writes, what it accepts, its options, its runner.

Torch-free, so `moeify export --help` can list every target. A new Hugging Face family is one
module in moeify/targets/hf/ (refuse() and to_hf()) and one entry here.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    summary: str  # one line for --help
    accepts: str  # source architectures and routing options it takes
    runner: str  # "module:function" taking (target, source, output, force, flags), imported on use
    options: tuple[str, ...] = ()  # the export options that belong to this target
    family: str | None = None  # hf-*: the module of moeify.targets.hf that maps the model


_HF = "moeify.cli.export_hf:export_hf_target"
TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("torch", "the moeify directory again (safetensors + moeify.json), re-saved", "any moeify output",
           "moeify.cli.export_hf:export_torch_target"),
    Target("torch-distributed", "one safetensors shard per rank + plan + sha256 manifest, for torchrun",
           "any moeify output", "moeify.cli.export_distributed:export_distributed_target",
           ("plan", "world_size", "allow_uneven")),
    Target("onnx", "ONNX graphs for onnxruntime (com.microsoft.MoE or standard ops)",
           "transformers models and custom modules; any routing", "moeify.cli.export_onnx:export_onnx_target",
           ("mode", "opset", "dtype", "provider", "optimize", "save_optimized", "check", "dynamo", "with_past",
            "quantize")),
    Target("hf-switch", "SwitchTransformersForConditionalGeneration (transformers)",
           "T5 v1.0 (ReLU, no bias) conversions and imported Switch checkpoints; top-1, gate = probability",
           _HF, ("seq_len",), family="switch"),
    Target("hf-mixtral", "MixtralForCausalLM (transformers)",
           "LLaMA / Mistral conversions of every layer (--every 1) with --normalize-gates; any --top-k",
           _HF, family="mixtral"),
    Target("hf-qwen3-moe", "Qwen3MoeForCausalLM (transformers)",
           "Qwen3 conversions; any layer selection, --top-k, with or without --normalize-gates",
           _HF, family="qwen3_moe"),
]}


def targets_help(width: int = 78) -> str:
    """One entry per target for `moeify export --help`, wrapped to `width` (kept as written by click's \\b)."""
    pad = max(len(name) for name in TARGETS) + 4
    lines = ["\b", "Targets (--target NAME): what each writes, and what it accepts."]
    for t in TARGETS.values():
        lines += textwrap.wrap(t.summary, width, initial_indent=f"  {t.name:<{pad - 2}}", subsequent_indent=" " * pad)
        lines += textwrap.wrap(f"accepts: {t.accepts}", width, initial_indent=" " * pad, subsequent_indent=" " * pad)
    return "\n".join(lines)
