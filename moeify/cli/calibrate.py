"""`moeify calibrate`: measure per-expert token loads of a converted model for load-aware planning."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from moeify.checkpoint.files import write_text_atomically
from moeify.checkpoint.metadata import read_metadata, require_weights
from moeify.cli.common import (
    check_output_file,
    console,
    human,
    verify_option,
)
from moeify.errors import MoeifyError
from moeify.planner.resources import check_memory, weight_bytes

# The work calibrate takes on: its forward passes at an optimistic 100 GFLOP/s per CPU core (the 2-core
# development machine reaches ~150 GFLOP/s in all), so the estimate is a lower bound, and at most a day of them.
FLOPS_PER_CORE = 100e9
LIMIT_S = 24 * 3600
DEFAULTS = {"--batches": 8, "--batch-size": 4, "--seq-len": 128}


@click.command("calibrate", short_help="Measure tokens per expert, for load-aware plans.")
@verify_option
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--batches", type=int, default=DEFAULTS["--batches"], show_default=True, help="Batches to run.")
@click.option("--batch-size", type=int, default=DEFAULTS["--batch-size"], show_default=True, help="Sequences per batch.")
@click.option("--seq-len", type=int, default=DEFAULTS["--seq-len"], show_default=True,
              help="Tokens per sequence (encoder-decoder models: decoders get SEQ_LEN/4).")
@click.option("--text", "text_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="UTF-8 text to route [default: the Python standard library's source].")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("load.json"), show_default=True,
              help="Where to write the loads (JSON, for `moeify plan --load`).")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
def calibrate_cmd(path: Path, batches: int, batch_size: int, seq_len: int, text_file: Path | None,
                  output: Path, force: bool) -> None:
    """Run the converted model at PATH on real text and record tokens per expert per layer.

    `moeify plan --load load.json` then places experts so that every GPU gets a similar load.

    \b
    Example:
      moeify calibrate out/switch-t5-small --batches 16 -o load.json
    """
    check_output_file(output, force, "load.json", [path])
    for flag, value in zip(DEFAULTS, (batches, batch_size, seq_len)):
        if value < 1:
            raise MoeifyError(f"{flag} must be at least 1, got {value}: leave it unset for {flag} {DEFAULTS[flag]}, "
                              "the default")
    meta = read_metadata(path)
    require_weights(path, meta, "calibration")
    _check_work(meta, batches, batch_size, seq_len)
    from moeify.conversion.text import text_option

    text = text_option(text_file)  # an empty --text fails before the model loads
    from moeify.checkpoint.store import load
    from moeify.cli.progress import progress_bars
    from moeify.conversion.text import local_tokenizer, text_batches, token_ids
    from moeify.planner.calibration import calibrate

    model = load(path)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise MoeifyError(f"{path} is not a language model with a vocabulary: calibrate it from Python "
                          "with moeify.planner.calibration.calibrate(model, batches)")
    source = Path(meta["source"]["path"]) if meta["source"].get("path") else None
    tokenizer = local_tokenizer([path] + ([source] if source else []))
    ids = token_ids(text, vocab, tokenizer)
    if len(ids) < batch_size * (seq_len + seq_len // 4 + 1):
        raise MoeifyError(f"the text has {len(ids)} tokens, fewer than one batch: give more text or a smaller --seq-len")
    stream = text_batches(ids, batches, batch_size, seq_len, bool(getattr(config, "is_encoder_decoder", False)))
    with progress_bars(console) as progress:
        result = calibrate(model, stream, total=batches, progress=progress)
    result["tokenizer"] = type(tokenizer).__name__ if tokenizer else "utf-8 bytes"
    write_text_atomically(output, json.dumps(result, indent=1))
    for name, layer in result["layers"].items():
        f = layer["fraction"]
        console.print(f"{name}: busiest expert {max(f) * len(f):.2f}x the mean, "
                      f"dropped {layer['dropped_fraction']:.1%}")
    console.print(f"wrote {output} ({result['tokenizer']} tokens)")


def _check_work(meta: dict, batches: int, batch_size: int, seq_len: int) -> None:
    """Refuse, before the model loads, weights and a forward pass that do not fit in memory, and batches that would
    run for days."""
    from moeify.conversion.text import window_tokens
    from moeify.planner.resources import saved_activation_bytes

    summary = meta["summary"]
    weights = weight_bytes(summary)
    check_memory(weights, "the model needs {} for its weights",
                 "calibrate on a machine with more memory, or a model with fewer experts")
    # Encoder-decoders: the decoder reads a quarter of --seq-len (text_batches).
    forward = saved_activation_bytes(meta, batch_size, seq_len, max(1, seq_len // 4), train=False)
    check_memory(weights + forward, "a forward pass needs at least {} (weights, activations)",
                 "lower --batch-size or --seq-len")
    per_batch = window_tokens(batch_size, seq_len) * 2 * summary["active_params"]  # forward FLOPs
    cores = os.cpu_count() or 1
    seconds = batches * per_batch / (FLOPS_PER_CORE * cores)
    if seconds > LIMIT_S:
        raise MoeifyError(f"--batches {batches} of {window_tokens(batch_size, seq_len):,} tokens through "
                          f"{human(summary['active_params'])} active parameters take at least {_duration(seconds)} "
                          f"on {cores} CPU cores: use a smaller --batches (8 to 64 measure the loads)")


def _duration(seconds: float) -> str:
    return f"{seconds / 86400:,.0f} days" if seconds >= 2 * 86400 else f"{seconds / 3600:.0f} hours"
