"""`moeify calibrate`: measure per-expert token loads of a converted model for load-aware planning."""
from __future__ import annotations

import json
from pathlib import Path

import click

from moeify.checkpoint.files import check_file_writable, write_text_atomically
from moeify.checkpoint.metadata import read_metadata
from moeify.cli.common import console
from moeify.errors import MoeifyError


@click.command("calibrate", short_help="Measure tokens per expert, for load-aware plans.")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--batches", type=int, default=8, show_default=True, help="Batches to run.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per batch.")
@click.option("--seq-len", type=int, default=128, show_default=True,
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
    check_file_writable(output, force)
    if min(batches, batch_size, seq_len) < 1:
        raise MoeifyError("--batches, --batch-size and --seq-len must be >= 1")
    meta = read_metadata(path)
    if not meta["weights"]:
        raise MoeifyError(f"{path} is structure only (converted on meta): calibration needs weights")
    from moeify.checkpoint.store import load
    from moeify.cli.progress import progress_bars
    from moeify.conversion.text import local_tokenizer, read_text, stdlib_text, text_batches, token_ids
    from moeify.planner.calibration import calibrate

    model = load(path)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise MoeifyError(f"{path} is not a language model with a vocabulary: calibrate it from Python "
                          "with moeify.planner.calibration.calibrate(model, batches)")
    source = Path(meta["source"]["path"]) if meta["source"].get("path") else None
    tokenizer = local_tokenizer([path] + ([source] if source else []))
    text = read_text(text_file) if text_file else stdlib_text()
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
