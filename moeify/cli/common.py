"""Shared pieces of the command line: the console, number formatting, MoE option flags."""
from __future__ import annotations

import functools
from pathlib import Path

import click
from rich.console import Console

from moeify.checkpoint.model_presets import PRESETS
from moeify.config import INIT_METHODS, MoEConfig

console = Console(highlight=False)


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def moe_options(f):
    """The MoEConfig flags, shared by `convert` and `plan` (which converts presets on meta)."""
    options = [
        click.option("--experts", "num_experts", type=int, default=None, help="Experts per converted FFN [default: 8]."),
        click.option("--every", type=int, default=None, help="Convert one FFN in EVERY within each stack [default: 2]."),
        click.option("--offset", type=int, default=None,
                     help="Index of the first converted FFN in each stack [default: 1]."),
        click.option("--layers", default=None, metavar="REGEX",
                     help="Convert the FFNs whose module name matches REGEX (overrides --every/--offset)."),
        click.option("--init", type=click.Choice(INIT_METHODS), default=None,
                     help="upcycle: experts copy the dense FFN; random: paper init [default: upcycle]."),
        click.option("--capacity-factor", type=float, default=None, help="Training capacity factor [default: 1.25]."),
        click.option("--eval-capacity-factor", type=float, default=None,
                     help="Evaluation capacity factor [default: 2.0]."),
        click.option("--min-capacity", type=int, default=None, help="Minimum slots per expert [default: 4]."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seeds preset weights and router init."),
    ]
    return functools.reduce(lambda g, option: option(g), reversed(options), f)


MOE_FLAGS = ("num_experts", "every", "offset", "layers", "init", "capacity_factor", "eval_capacity_factor",
             "min_capacity", "seed")


def moe_config(source: str, flags: dict) -> MoEConfig:
    """MoEConfig from a preset's MoE defaults overridden by the flags that were given."""
    preset_moe = PRESETS[source].moe if source in PRESETS and not Path(source).exists() else {}
    return MoEConfig(**{**preset_moe, **{k: v for k, v in flags.items() if v is not None}})
