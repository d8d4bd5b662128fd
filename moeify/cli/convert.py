"""`moeify convert`: a preset or a local Hugging Face directory -> a saved Switch model."""
from __future__ import annotations

import time
from pathlib import Path

import click

from moeify.checkpoint.files import check_not_inside, check_writable
from moeify.checkpoint.model_presets import resolve_source
from moeify.cli.common import (
    check_output_parent,
    console,
    converted_model,
    human,
    moe_config,
    moe_options,
    print_init_reports,
    table,
    weight_bytes_of,
)
from moeify.config import MoEConfig
from moeify.errors import MoeifyError
from moeify.planner.resources import check_memory


def _check_memory(source: str, config: MoEConfig, flags: dict) -> None:
    """Convert on the meta device first: cheap, and it fails fast when weights cannot fit."""
    check_memory(weight_bytes_of(converted_model(source, config, flags, "meta")),
                 "the converted model needs {} for its weights",
                 "use --device meta for a structure-only conversion, or fewer --experts")


@click.command("convert", short_help="Convert a preset or a Hugging Face model into a Switch model.")
@click.argument("source")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output directory [default: out/switch-<source name>].")
@moe_options
@click.option("--device", type=click.Choice(["cpu", "meta", "cuda"]), default="cpu", show_default=True,
              help="meta builds the structure only (no weights): instant, even for Switch-C.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Run one forward pass on a synthetic batch and report routing.")
@click.option("-v", "--verbose", is_flag=True,
              help="Also list the modules with two or more Linears that are not FFNs, and why.")
def convert_cmd(source: str, output: Path | None, device: str, force: bool, check: bool, verbose: bool,
                **flags) -> None:
    """Convert SOURCE (a preset name or a local Hugging Face directory) into a Switch model.

    Every matched dense FFN (Linear -> activation -> Linear, or its gated form) in the
    selected layers becomes a SwitchFFN: a float32 top-1 router and stacked experts,
    upcycled from the dense weights by default. A transformers SwitchTransformers directory
    (the layout of switch-base-8 ... switch-c-2048) is imported as it is: its experts, routers
    and sparse layers come from the checkpoint, and only run-time flags (capacity, losses,
    jitter, dropout) apply.

    \b
    Examples:
      moeify convert t5-small --experts 8 -o out/switch-t5-small
      moeify convert path/to/hf-t5 --experts 16 --capacity-factor 1.5 -o out/x
      moeify convert t5-base --experts 128 --device meta -o out/plan-only
      moeify convert switch-c-2048 --device meta -o out/c  # the paper's 1.6T
      moeify convert path/to/switch-base-8 -o out/switch-base-8  # imported
    """
    config = moe_config(source, flags)
    seed = config.seed
    output = output or Path("out") / f"switch-{Path(source).name}"
    if Path(source).is_dir():
        check_not_inside(output, Path(source))
    check_writable(output, force)
    check_output_parent(output)  # a read-only or impossible -o fails before the conversion, not after it
    resolve_source(source)  # a typo fails here, before torch is imported
    import torch

    from moeify.checkpoint.store import save
    from moeify.cli.progress import progress_bars

    if device == "cuda" and not torch.cuda.is_available():
        raise MoeifyError("--device cuda but torch sees no CUDA device: use --device cpu or meta")
    if device != "meta":
        _check_memory(source, config, flags)
    t0 = time.perf_counter()
    with progress_bars(console) as progress:
        sparse = converted_model(source, config, flags, device, progress)
    elapsed = time.perf_counter() - t0
    _print_conversion(sparse, source, elapsed, verbose)
    imported = sparse.moeify_record.source
    if imported.get("imported"):
        c = sparse.moeify_record.config
        console.print(f"[yellow]note[/] the checkpoint's expert_capacity {imported.get('expert_capacity')} per "
                      f"sequence is not used: moeify limits each expert per batch with capacity factor "
                      f"{c.capacity_factor} (eval {c.eval_capacity_factor}); set them with --capacity-factor "
                      "and --eval-capacity-factor, or --dropless")
    if check and device != "meta":
        _forward_check(sparse, seed)
    with progress_bars(console) as progress:
        out = save(sparse, output, force=force, progress=progress)
    kind = "structure only (meta device, no weights)" if device == "meta" else "weights + configs"
    console.print(f"saved {kind} to [bold]{out}[/]")


def _print_conversion(model, source: str, elapsed: float, verbose: bool = False) -> None:
    from moeify.checkpoint.summary import summarize

    record = model.moeify_record
    summary = summarize(model)
    c = record.config
    t = table("site", ("experts", "right"), ("d_model", "right"), ("d_ff", "right"), "ffn",
              title=f"{source}: {len(record.sites)} FFNs -> SwitchFFN "
                    f"({'imported' if record.source.get('imported') else c.init}) in {elapsed:.1f}s")
    for s in summary.moe_layers:
        kind = ("gated " if s.gated else "") + s.activation + (" +bias" if s.bias else "")
        t.add_row(s.name, str(s.num_experts), str(s.d_model), str(s.d_ff), kind)
    console.print(t)
    if record.skipped:
        console.print(f"left dense by --every {c.every} --offset {c.first}"
                      f"{' --layers' if c.layers else ''}: {len(record.skipped)} FFNs")
    _print_rejected(record.rejected, verbose)
    console.print(f"parameters: {human(summary.total_params)} total, {human(summary.active_params)} "
                  f"active per token, {human(summary.dense_params)} outside the experts")
    print_init_reports(summary.moe_layers, c.init, c.router_init)


def _print_rejected(rejected: dict[str, str], verbose: bool) -> None:
    """Modules that looked like FFN candidates but are not: one quiet line, or each with its reason."""
    if not rejected:
        return
    if not verbose:
        n = len(rejected)
        console.print(f"[dim]{n} other module{'s' if n > 1 else ''} with two or more Linears "
                      f"{'are not FFNs' if n > 1 else 'is not an FFN'} (--verbose lists them)[/]")
        return
    from rich.text import Text

    names_by_reason: dict[str, list[str]] = {}
    for name, why in rejected.items():
        names_by_reason.setdefault(why, []).append(name)
    for why, names in names_by_reason.items():
        console.print(Text(f"not an FFN ({len(names)}): {why}", style="dim"))
        console.print(Text("\n".join("  " + name for name in names), style="dim"))


def _forward_check(model, seed: int) -> None:
    import torch

    from moeify.checkpoint.sample import sample_inputs
    from moeify.layers.collector import router_losses

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
    c = model.moeify_record.config
    what = "tokens" if c.top_k == 1 else f"top-{c.top_k} assignments"
    drops = ("dropless: no token dropped" if c.dropless else
             f"dropped {losses.dropped_fraction():.1%} of {what} (eval capacity factor {c.eval_capacity_factor})")
    console.print(f"forward check: {dict((k, tuple(v.shape)) for k, v in inputs.items())} -> logits {shape} "
                  f"in {ms:.0f} ms; {drops}, busiest expert {balance:.2f}x the mean load")
