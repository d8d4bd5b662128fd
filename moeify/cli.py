"""The `moeify` command line: a thin click layer over the public API."""
from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from .atomic import check_writable
from .config import INIT_METHODS, MoEConfig
from .errors import MoeifyError
from .layers.collector import router_losses
from .pipeline import convert
from .presets import PRESETS
from .progress import progress_bars
from .sample import sample_inputs
from .sources import load_dense
from .summary import ModelSummary, summarize
from .targets.torch_local import read_manifest, save

console = Console(highlight=False)


class _Group(click.Group):
    """Turns user mistakes (MoeifyError) into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoeifyError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moeify")
def main() -> None:
    """Compile dense transformers into Switch Transformer mixture-of-experts models.

    \b
    moeify convert t5-small --experts 8 -o out/switch-t5-small   # preset -> Switch model
    moeify inspect out/switch-t5-small                           # layers, experts, params
    moeify presets                                               # built-in model configs
    """


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _config_from_flags(preset_moe: dict, flags: dict) -> MoEConfig:
    values = {**preset_moe, **{k: v for k, v in flags.items() if v is not None}}
    return MoEConfig(**values)


def _check_memory(source: str, config: MoEConfig, seed: int) -> None:
    """Convert on the meta device first: cheap, and it fails fast when weights cannot fit."""
    skeleton, _ = load_dense(source, device="meta", seed=seed)
    summary = summarize(convert(skeleton, config, inplace=True))
    need = summary.total_params * torch.finfo(getattr(torch, summary.dtype)).bits // 8
    available = _available_bytes()
    if available is not None and need > 0.8 * available:
        raise MoeifyError(
            f"the converted model needs {need / 2**30:.1f} GiB for its weights but {available / 2**30:.1f} GiB "
            f"of memory is available: use --device meta for a structure-only conversion, or fewer --experts")


@main.command("convert")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: out/switch-<source name>].")
@click.option("--experts", "num_experts", type=int, default=None, help="Experts per converted FFN [default: 8].")
@click.option("--every", type=int, default=None, help="Convert one FFN in EVERY within each stack [default: 2].")
@click.option("--offset", type=int, default=None, help="Index of the first converted FFN in each stack [default: 1].")
@click.option("--layers", default=None, metavar="REGEX",
              help="Convert the FFNs whose module name matches REGEX (overrides --every/--offset).")
@click.option("--init", type=click.Choice(INIT_METHODS), default=None,
              help="upcycle: experts copy the dense FFN; random: paper init [default: upcycle].")
@click.option("--capacity-factor", type=float, default=None, help="Training capacity factor [default: 1.25].")
@click.option("--eval-capacity-factor", type=float, default=None, help="Evaluation capacity factor [default: 2.0].")
@click.option("--min-capacity", type=int, default=None, help="Minimum slots per expert [default: 4].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds preset weights and router init.")
@click.option("--device", type=click.Choice(["cpu", "meta", "cuda"]), default="cpu", show_default=True,
              help="meta builds the structure only (no weights): instant, even for Switch-C.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run one forward pass on a synthetic batch and report routing.")
def convert_cmd(source: str, output: Path | None, seed: int, device: str, force: bool, check: bool,
                **flags) -> None:
    """Convert SOURCE (a preset name or a local Hugging Face directory) into a Switch model.

    Every matched dense FFN (Linear -> activation -> Linear, or its gated form) in the
    selected layers becomes a SwitchFFN: a float32 top-1 router and stacked experts,
    upcycled from the dense weights by default.

    \b
    Examples:
      moeify convert t5-small --experts 8 -o out/switch-t5-small
      moeify convert path/to/hf-t5 --experts 16 --every 2 --capacity-factor 1.25 -o out/x
      moeify convert t5-base --experts 128 --device meta -o out/plan-only
      moeify convert switch-c-2048 --device meta -o out/switch-c   # the paper's 1.6T model
    """
    preset_moe = PRESETS[source].moe if source in PRESETS and not Path(source).exists() else {}
    config = _config_from_flags(preset_moe, {**flags, "seed": seed})
    output = output or Path("out") / f"switch-{Path(source).name}"
    check_writable(output, force)
    if device == "cuda" and not torch.cuda.is_available():
        raise MoeifyError("--device cuda but torch sees no CUDA device: use --device cpu or meta")
    if device != "meta":
        _check_memory(source, config, seed)
    t0 = time.perf_counter()
    dense, _ = load_dense(source, device=device, seed=seed)
    with progress_bars(console) as progress:
        sparse = convert(dense, config, inplace=True, progress=progress)
    elapsed = time.perf_counter() - t0
    _print_conversion(sparse, source, elapsed)
    if check and device != "meta":
        _forward_check(sparse, seed)
    with progress_bars(console) as progress:
        out = save(sparse, output, force=force, progress=progress)
    kind = "structure only (meta device, no weights)" if device == "meta" else "weights + configs"
    console.print(f"saved {kind} to [bold]{out}[/]")


def _print_conversion(model, source: str, elapsed: float) -> None:
    record = model.moeify_record
    summary = summarize(model)
    c = record.config
    table = Table(title=f"{source}: {len(record.sites)} FFNs -> SwitchFFN ({c.init}) in {elapsed:.1f}s")
    for col in ("site", "experts", "d_model", "d_ff", "ffn"):
        table.add_column(col, justify="left" if col in ("site", "ffn") else "right", overflow="fold")
    for s in record.sites:
        kind = ("gated " if s.gated else "") + s.activation + (" +bias" if s.bias else "")
        table.add_row(s.name, str(c.num_experts), str(s.d_model), str(s.d_ff), kind)
    console.print(table)
    if record.skipped:
        console.print(f"left dense by --every {c.every} --offset {c.offset}"
                      f"{' --layers' if c.layers else ''}: {len(record.skipped)} FFNs")
    for why, n in Counter(record.rejected.values()).items():
        console.print(f"[dim]not an FFN: {n} x {why}[/]")
    console.print(f"parameters: {_human(summary.total_params)} total, {_human(summary.active_params)} "
                  f"active per token, {_human(summary.dense_params)} outside the experts")


def _forward_check(model, seed: int) -> None:
    inputs = sample_inputs(model, seed=seed)
    if inputs is None:
        console.print("[dim]forward check skipped: unknown input format[/]")
        return
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), router_losses(model) as losses:
        out = model(**inputs)
    ms = (time.perf_counter() - t0) * 1e3
    logits = getattr(out, "logits", None)
    shape = tuple(logits.shape) if logits is not None else "-"
    counts = torch.stack([r.tokens_per_expert for r in losses.layers]).float()  # (layers, E)
    balance = (counts.max(dim=1).values / counts.mean(dim=1)).mean().item()
    console.print(f"forward check: {dict((k, tuple(v.shape)) for k, v in inputs.items())} -> logits {shape} "
                  f"in {ms:.0f} ms; dropped {losses.dropped_fraction():.1%} of tokens "
                  f"(eval capacity factor {model.moeify_record.config.eval_capacity_factor}), "
                  f"busiest expert {balance:.2f}x the mean load")


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the same data as JSON.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Show a converted model: parameters, active parameters per token, Switch layers.

    \b
    Examples:
      moeify inspect out/switch-t5-small
      moeify inspect out/switch-t5-small --json | jq .active_params
    """
    meta = read_manifest(path)
    data = {**meta["summary"], "source": meta["source"], "moe_config": meta["moe_config"],
            "weights": meta["weights"]}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    s = ModelSummary(**{**meta["summary"], "moe_layers": []})
    layers = meta["summary"]["moe_layers"]
    origin = meta["source"].get("name") or meta["source"].get("path") or meta["source"].get("class")
    console.print(f"[bold]{path}[/]: {s.model} from {origin}, {s.dtype}"
                  f"{'' if meta['weights'] else ', structure only (no weights)'}")
    console.print(f"parameters: {_human(s.total_params)} total, {_human(s.active_params)} active per token, "
                  f"{len(layers)} Switch layers x {s.num_experts} experts (exact counts: --json)")
    table = Table()
    width = max((len(row["name"]) for row in layers), default=5)
    table.add_column("layer", min_width=min(width, 48), overflow="fold")
    for col in ("experts", "d_model", "d_ff", "gated", "capacity", "params"):
        table.add_column(col, justify="right")
    for row in layers:
        table.add_row(row["name"], str(row["num_experts"]), str(row["d_model"]), str(row["d_ff"]),
                      "yes" if row["gated"] else "no",
                      f"{row['capacity_factor']}/{row['eval_capacity_factor']}", _human(row["expert_params"]))
    console.print(table)


@main.command("presets")
def presets_cmd() -> None:
    """List the built-in model presets (random init, seeded by --seed).

    Switch presets also set the MoE options of the paper; flags given to convert override them.
    """
    table = Table()
    table.add_column("name", no_wrap=True)
    for col in ("d_model", "d_ff", "layers"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("ffn", no_wrap=True)
    table.add_column("experts", no_wrap=True)
    for p in PRESETS.values():
        moe = f"{p.moe['num_experts']}, every {p.moe['every']}" if p.moe else "-"
        table.add_row(p.name, str(p.t5["d_model"]), str(p.t5["d_ff"]),
                      f"{p.t5['num_layers']}+{p.t5['num_layers']}", p.t5["feed_forward_proj"], moe)
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
