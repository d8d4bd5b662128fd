"""`moeify presets`: the built-in model configs."""
from __future__ import annotations

import click

from moeify.checkpoint.model_presets import PRESETS
from moeify.cli.common import console, table


@click.command("presets", short_help="List the built-in model presets.")
def presets_cmd() -> None:
    """List the built-in model presets: T5 configs, the Switch Transformers paper's models and
    one released model of each dense family (BERT, GPT-2, BART, ViT, Phi-3, Mistral, Llama 3,
    Qwen3), which `moeify convert NAME` and `moeify plan NAME` build with random weights.

    Switch presets also set the MoE options of the paper; flags given to convert override them.

    \b
    Examples:
      moeify presets
      moeify convert switch-base-128 --device meta -o out/b   # structure only
      moeify convert llama-3-8b --experts 8 --device meta -o out/l
    """
    t = table("name", ("d_model", "right"), ("d_ff", "right"), ("layers", "right"), "ffn", "experts")
    for p in PRESETS.values():
        moe = f"{p.moe['num_experts']}, every {p.moe['every']}" if p.moe else "-"
        t.add_row(p.name, str(p.d_model), str(p.d_ff), p.layers, p.ffn, moe)
    console.print(t)
