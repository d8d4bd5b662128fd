"""`moeify compare`: training runs side by side, as a table (or JSON) and a PNG of their validation curves."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click

from moeify.checkpoint.files import cannot_write, make_output_dir
from moeify.cli.common import check_output_file, console, human, table
from moeify.errors import MoeifyError
from moeify.training.compare import Comparison, Curve, compare, curve, group_variants
from moeify.training.runs import read_run

DEFAULT_PLOT = Path("compare.png")
FIGSIZE, DPI = (11.0, 4.5), 100  # a 1100 x 450 pixel PNG


@click.command("compare", short_help="Compare training runs: losses, speed, curves.")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help=f"Where to draw the validation curves (PNG) [default: {DEFAULT_PLOT}; with --json, "
                   "only when given].")
@click.option("--threshold", type=float, default=None, metavar="LOSS",
              help="Validation loss to time each run to [default: the worst of the runs' best losses, "
                   "which every run reaches].")
@click.option("--json", "as_json", is_flag=True, help="Print the table's data as JSON.")
@click.option("--force", is_flag=True, help="Replace the PNG if it exists.")
def compare_cmd(runs: tuple[Path, ...], output: Path | None, threshold: float | None, as_json: bool,
                force: bool) -> None:
    """Compare run directories written by `moeify train`: each run's final and best validation loss,
    the steps and wall time it took to reach a common loss, its parameters and tokens/s; and a PNG
    of validation loss against steps and against wall time. Runs trained with one --group, or whose
    run.json agree on everything but name and seed, are seeds of one variant: drawn as their mean
    with a min..max band.

    \b
    Examples:
      moeify compare runs/dense runs/switch-8e -o compare.png
      moeify compare runs/switch-8e-seed* runs/dense-seed* --threshold 2.5
      moeify compare runs/* --json | jq '.runs[].steps_to_threshold'
    """
    if threshold is not None and not math.isfinite(threshold):  # nan: no run would ever reach it
        raise MoeifyError(f"--threshold must be a finite loss, got {threshold}: pass e.g. --threshold 2.5, or leave "
                          "it unset for the worst run's best validation loss")
    plot = output if output is not None or as_json else DEFAULT_PLOT
    if plot is not None:  # not into a run it reads (its metrics.csv), nor onto a directory
        check_output_file(plot, force, DEFAULT_PLOT.name, runs)
    loaded = [read_run(path) for path in runs]
    result = compare(loaded, threshold)
    curves = [curve(variant) for variant in group_variants(loaded)]  # checked before anything is written
    if plot is not None:
        draw(curves, plot)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    print_comparison(result)
    if plot is not None:
        console.print(f"drew {plot}")


def loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def print_comparison(c: Comparison) -> None:
    t = table("run", ("final\nval", "right"), ("best\nval", "right"), ("step\nto T", "right"),
              ("time\nto T", "right"), ("params", "right"), ("active", "right"), ("tokens/s", "right"),
              title=f"validation loss, threshold T = {c.threshold:.4f}"
                    + ("" if c.threshold_given else " (the worst best loss)"))
    t.caption = "-: T never reached; active: parameters per token"
    for r in c.runs:
        t.add_row(r.name, loss(r.final_val_loss), loss(r.best_val_loss),
                  "-" if r.steps_to_threshold is None else str(r.steps_to_threshold),
                  duration(r.seconds_to_threshold), human(r.params_total), human(r.params_active),
                  "-" if r.tokens_per_second is None else human(r.tokens_per_second))
    console.print(t)


def draw(curves: list[Curve], path: Path) -> None:
    """Two panels, validation loss against steps and against wall time; a band where a variant has seeds."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI, layout="constrained")
    for i, c in enumerate(curves):
        colour = f"C{i % 10}"
        for ax, x in ((by_step, c.steps), (by_time, c.seconds)):
            ax.plot(x, c.mean, color=colour, label=c.label, marker="." if len(x) < 30 else None)
            if c.low != c.high:
                ax.fill_between(x, c.low, c.high, color=colour, alpha=0.2, linewidth=0)
    by_step.set(xlabel="step", ylabel="validation loss", title="validation loss by step")
    by_time.set(xlabel="wall time (s)", title="validation loss by wall time")
    by_step.legend(fontsize=8)
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    make_output_dir(path.parent, path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        try:
            fig.savefig(tmp, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays FIGSIZE x DPI
        except OSError as e:
            raise cannot_write(path, e) from None
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
