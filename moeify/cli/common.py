"""Shared pieces of the command line: the console, tables, number formatting, MoE option flags.

Everything the CLI imports to build its click group is light (click, rich's Console, torch-free
moeify modules): commands import torch, transformers, onnx and the planner when they run.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import click
from rich.console import Console

from moeify.checkpoint.files import cannot_write, check_file_writable, check_not_inside
from moeify.checkpoint.model_presets import PRESETS
from moeify.config import INIT_METHODS, KERNELS, ROUTER_DTYPES, ROUTER_INITS, MoEConfig
from moeify.errors import MoeifyError

if TYPE_CHECKING:
    from rich.table import Table

console = Console(highlight=False)
FLAG_NAMES = {"num_experts": "--experts"}  # options whose flag is not the parameter name


def table(*columns: str | tuple[str, str], title: str | None = None) -> Table:
    """A table that reads at 80 columns: a rule under the header, no side borders, one space of
    padding, and cells that wrap (fold) instead of being cut. A column is a header, or
    (header, "right") for a right-aligned one; a newline in a header gives it two lines."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1),
              collapse_padding=True)
    for col in columns:
        header, justify = col if isinstance(col, tuple) else (col, "left")
        t.add_column(header, justify=justify, overflow="fold")
    return t


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def moe_options(f, skip: tuple[str, ...] = ()):
    """One flag per MoEConfig field, shared by `convert`, `plan` (which converts presets on meta) and `train`.

    Defaults are left to MoEConfig (and a preset's own MoE options), so only given flags override.
    """
    return dataclass_options(MoEConfig, CHOICES, skip=skip, flag_names=FLAG_NAMES, metavars=METAVARS)(f)


def verify_option(f):
    """--verify/--no-verify on a command that reads moeify directories: every reader it calls checks the files
    against their moeify-manifest.json unless --no-verify (integrity.unverified), as `moeify.load(verify=...)`."""

    @click.option("--verify/--no-verify", "verify", default=True, show_default=True,
                  help="Check the model's files against the sha256 and sizes in its moeify-manifest.json. "
                       "--no-verify skips the hashing, for very large trusted models: a tampered or corrupted "
                       "file then goes unnoticed.")
    @functools.wraps(f)
    def command(*args, verify: bool, **kwargs):
        from moeify.checkpoint.integrity import unverified

        with unverified(not verify):
            return f(*args, **kwargs)

    return command


def print_init_reports(layers, init: str, router_init: str) -> None:
    """What --init moefy and --router-init hidden measured on the calibration text, one row per layer."""
    rows = [s for s in layers if s.init_report is not None]
    if not rows:
        return
    moefy = init == "moefy"
    router = "centroid" if moefy else router_init
    t = table("layer", ("tokens", "right"), *((("top-1\nerror", "right"), ("top-2\nerror", "right")) if moefy else ()),
              (f"load CV\n{router}", "right"), ("load CV\nrandom", "right"),
              title=f"initialisation measured on calibration text ({init}, router {router})")
    t.caption = (("error: ||y - y_dense|| / ||y_dense|| with each token's top-k experts at gate 1; " if moefy else "")
                 + "load CV: std / mean of tokens per expert, against the paper's random router")
    for s in rows:
        r = s.init_report
        errors = [_maybe(r.top1_error), _maybe(r.top2_error)] if moefy else []
        t.add_row(s.name, str(r.tokens), *errors, f"{r.load_cv:.2f}", f"{r.random_load_cv:.2f}")
    console.print(t)


def _maybe(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


CHOICES = {"init": INIT_METHODS, "router_init": ROUTER_INITS, "router_dtype": ROUTER_DTYPES, "kernel": KERNELS}
METAVARS = {"layers": "REGEX", "upcycle_scale": "none|auto|FLOAT", "text": "FILE"}


def moe_config(source: str, flags: dict) -> MoEConfig:
    """MoEConfig from a preset's MoE defaults overridden by the flags that were given."""
    preset_moe = PRESETS[source].moe if source in PRESETS and not Path(source).exists() else {}
    return MoEConfig(**{**preset_moe, **{k: v for k, v in flags.items() if v is not None}})


def option_flag(name: str, value: str | None) -> str:
    """How an error names option `name` (with `value`, a Python repr, if any) on the command line."""
    flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    if value is None or value == "True":
        return flag
    if value == "False":
        return f"--no-{flag[2:]}"
    return f"{flag} {value}"


def converted_model(source: str, config: MoEConfig, flags: dict, device: str, progress=None):
    """SOURCE converted (shared by `convert` and `train`): a SwitchTransformers directory is imported
    as it is (its experts are its weights), any other dense model converted with `config`."""
    from moeify.checkpoint.hf_switch import is_switch_directory

    if is_switch_directory(source):
        from moeify.checkpoint.switch_import import import_switch

        return import_switch(source, device=device, overrides=flags, progress=progress)
    from moeify.checkpoint.sources import load_dense
    from moeify.conversion.pipeline import convert

    dense = load_dense(source, device=device, seed=config.seed)
    tokenizer = None
    if config.reads_text and device != "meta" and dense.source.get("path"):
        from moeify.conversion.text import local_tokenizer

        tokenizer = local_tokenizer([Path(dense.source["path"])])  # else the text's UTF-8 bytes
    return convert(dense.model, config, inplace=True, source=dense.source, progress=progress, tokenizer=tokenizer)


def dataclass_options(cls, choices: dict[str, tuple[str, ...]] | None = None, *, skip: tuple[str, ...] = (),
                      flag_names: dict[str, str] | None = None, metavars: dict[str, str] | None = None):
    """One flag per field of dataclass `cls` (MoEConfig, TrainConfig, DataConfig): type, help and the
    default it shows come from the dataclass itself, so the CLI never restates them.

    Every click default is None, so a command sees which flags were given and the dataclass (or a
    preset) supplies the rest. A bool field is an --x/--no-x switch; `skip` leaves out fields that a
    command defines its own way; `metavars` marks free-text fields (a pattern, a number or keyword).
    """
    choices, flag_names, metavars = choices or {}, flag_names or {}, metavars or {}

    def decorate(f):
        options = []
        for field in dataclasses.fields(cls):
            name, default = field.name, field.default
            if name in skip:
                continue
            text = field.metadata["help"]
            flag = flag_names.get(name, "--" + name.replace("_", "-"))
            shown = ("on" if default else "off") if isinstance(default, bool) else default
            kw: dict = {"default": None, "help": text[0].upper() + text[1:] + (
                f" [default: {shown}]" if default is not None and "[default" not in text else "") + "."}
            if isinstance(default, bool):  # a switch; unset (None) leaves the dataclass's value
                flag = f"{flag}/--no-{flag[2:]}"
            elif name in choices:
                kw["type"] = click.Choice(choices[name])
            elif name in metavars:
                kw["metavar"] = metavars[name]
            elif "Path" in str(field.type):
                kw["type"] = click.Path(path_type=Path)
            else:  # the annotation's first type: "float | None" is a float whose default is unset
                kw["type"] = {"int": int, "float": float, "str": str}[str(field.type).split("|")[0].strip()]
            options.append(click.option(flag, name, **kw))
        return functools.reduce(lambda g, option: option(g), reversed(options), f)

    return decorate


def weight_bytes_of(model) -> int:
    """The bytes of `model`'s weights (any device, meta included), counted as moeify.json's summary counts them."""
    from moeify.checkpoint.summary import summarize
    from moeify.planner.resources import weight_bytes

    return weight_bytes(summarize(model).to_dict())


def check_output_file(path: Path, force: bool, example: str, inputs: Iterable[str | Path] = ()) -> None:
    """Before any work: FILE output `path` does not exist (or --force), is no directory, lies in none of the
    `inputs` that are directories (it would replace a file the command reads: a model's moeify.json, a run's
    metrics.csv), and its folder can be made or written, so a long run never ends in a refusal to write.
    `example` is a file name to suggest."""
    for source in inputs:
        if Path(source).is_dir():
            check_not_inside(path, Path(source))
    check_file_writable(path, force)
    if path.is_dir():
        raise MoeifyError(f"{path} is a directory, and this output is a file: name a file, e.g. {path / example}")
    check_output_parent(path)


def check_output_parent(out: Path) -> None:
    """Refuse output `out` when its nearest existing ancestor is a file or a folder this process cannot write in."""
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise cannot_write(out, NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))
    try:  # a nameless file (O_TMPFILE) asks the file system itself: read-only mounts, /proc, permissions
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise cannot_write(out, e) from None
