"""The run directory: metrics.csv (one row per logged step) and run.json, written by training, read by compare."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from moeify.checkpoint.files import read_json, write_text_atomically
from moeify.checkpoint.schemas import METRICS
from moeify.errors import MoeifyError

METRICS_FILE = "metrics.csv"
RUN_FILE = "run.json"
RUN_SCHEMA, RUN_VERSION = "moeify.run", 1
# metrics.csv's columns are declared with every file's schema, in checkpoint/schemas.py.
LOAD_CV_PREFIX, COLUMNS = METRICS.prefix, METRICS.columns  # then one column per Switch layer: load_cv/<layer name>
WRITTEN_BY = "`moeify train` writes one"


@dataclass(frozen=True)
class MetricsRow:
    """One logged step. `tokens` and `wall_seconds` count from the start of the run."""

    step: int
    tokens: int
    wall_seconds: float
    lr: float
    train_loss: float
    val_loss: float | None = None
    aux_loss: float | None = None
    z_loss: float | None = None
    dropped_fraction: float | None = None
    load_cv_mean: float | None = None
    load_cv: dict[str, float] = field(default_factory=dict)  # Switch layer name -> std / mean of its expert loads


@dataclass(frozen=True)
class Metrics:
    layers: tuple[str, ...]  # the Switch layers, in column order (none for a dense run)
    rows: list[MetricsRow]


def header(layers: Sequence[str]) -> list[str]:
    return [*COLUMNS, *(LOAD_CV_PREFIX + name for name in layers)]


def _cell(value: float | int | None) -> str:
    return "" if value is None else str(value) if isinstance(value, int) else repr(float(value))  # repr round-trips


class MetricsWriter:
    """Appends rows to RUN_DIR/metrics.csv, flushing each, so a killed run leaves only complete rows.

    The header is written once; opening an existing file (a resumed run) checks its header instead and
    drops a partial last line. Use as a context manager, or call close().
    """

    def __init__(self, run_dir: str | Path, layers: Sequence[str] = ()):
        self.path, self.layers = Path(run_dir) / METRICS_FILE, tuple(layers)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            text = self.path.read_text()
            if next(csv.reader(io.StringIO(text)), []) != header(self.layers):
                raise MoeifyError(f"{self.path} has other columns than this run logs: start a new run directory")
            if not text.endswith("\n"):  # a row cut short by a kill
                self.path.write_text(text[: text.rfind("\n") + 1])
            self._file = self.path.open("a", newline="")
            self._csv = csv.writer(self._file, lineterminator="\n")
        else:
            self._file = self.path.open("w", newline="")
            self._csv = csv.writer(self._file, lineterminator="\n")
            self._write(header(self.layers))

    def append(self, row: MetricsRow) -> None:
        if set(row.load_cv) != set(self.layers):
            raise ValueError(f"row of step {row.step} has load_cv for {sorted(row.load_cv)}, the file {self.layers}")
        self._write([_cell(getattr(row, name)) for name in COLUMNS] + [_cell(row.load_cv[n]) for n in self.layers])

    def _write(self, cells: list[str]) -> None:
        self._csv.writerow(cells)
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> Metrics:
    """Every row of RUN_DIR/metrics.csv, typed; a MoeifyError naming the file, line and column otherwise."""
    path = Path(run_dir) / METRICS_FILE
    try:
        with path.open(newline="") as f:
            text = f.read()
        lines = list(csv.reader(text.splitlines()))
    except FileNotFoundError:
        raise MoeifyError(f"{Path(run_dir)} has no {METRICS_FILE}: not a run directory ({WRITTEN_BY})") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MoeifyError(f"{path} cannot be read ({e})") from None
    if not lines:
        raise MoeifyError(f"{path} is empty: it has no header line")
    columns = lines[0]
    METRICS.check_header(columns, path)
    layers = tuple(c.removeprefix(LOAD_CV_PREFIX) for c in columns if c.startswith(LOAD_CV_PREFIX))
    if len(lines) > 1 and not text.endswith("\n"):
        # A row still being written, or cut by a kill: the writer ends every row with a newline, and
        # `train --resume` drops such a row too. The complete rows before it are the run so far.
        lines = lines[:-1]
    rows = []
    for line, cells in enumerate(lines[1:], start=2):
        if len(cells) != len(columns):
            raise MoeifyError(f"{path} line {line} has {len(cells)} cells, the header {len(columns)}")
        values = {c: METRICS.parse(path, line, c, cell) for c, cell in zip(columns, cells)}
        rows.append(MetricsRow(**{c: values[c] for c in COLUMNS},
                               load_cv={name: values[LOAD_CV_PREFIX + name] for name in layers}))
    return Metrics(layers, rows)


@dataclass(frozen=True)
class RunInfo:
    """What run.json says about a run. Runs that agree on everything but `name` and `seed` are one variant."""

    name: str
    source: str  # the dense model: a preset or a directory
    dense: bool  # True: the dense baseline, with no moe_config
    seed: int
    params_total: int
    params_active: int  # per token
    moe_config: dict | None
    steps: int
    batch_size: int
    seq_len: int
    objective: str
    group: str | None = None  # `train --group`: runs with one group are seeds of one variant, whatever else differs

    def __post_init__(self):
        problem = _problem(dataclasses.asdict(self))
        if problem:
            raise MoeifyError(f"{RUN_FILE} of run {self.name!r}: {problem}")

    def to_dict(self) -> dict:
        return {"schema": RUN_SCHEMA, "version": RUN_VERSION, **dataclasses.asdict(self)}


_TYPES = {"name": str, "source": str, "dense": bool, "seed": int, "params_total": int, "params_active": int,
          "moe_config": (dict, type(None)), "steps": int, "batch_size": int, "seq_len": int, "objective": str,
          "group": (str, type(None))}
OPTIONAL = {"group": None}  # keys a run.json may leave out, and their values then


def _problem(info: dict) -> str | None:
    """What is wrong with run.json's fields, in words, or None."""
    for name, kind in _TYPES.items():
        value = info[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):  # bool is an int in Python
            return f"{name} is {value!r}, not {getattr(kind, '__name__', 'an object or null')}"
    for name in ("steps", "batch_size", "seq_len"):
        if info[name] < 1:
            return f"{name} must be positive, got {info[name]}"
    if not 0 <= info["params_active"] <= info["params_total"]:
        return f"params_active {info['params_active']} must lie in 0..params_total {info['params_total']}"
    if info["dense"] != (info["moe_config"] is None):
        return "a dense run has moe_config null, a Switch run an object"
    return None


def write_run_info(run_dir: str | Path, info: RunInfo) -> Path:
    """RUN_DIR/run.json, written atomically (a temporary sibling renamed)."""
    path = Path(run_dir) / RUN_FILE
    write_text_atomically(path, json.dumps(info.to_dict(), indent=2) + "\n")
    return path


def read_run_info(run_dir: str | Path) -> RunInfo:
    path = Path(run_dir) / RUN_FILE
    if not path.exists():
        raise MoeifyError(f"{Path(run_dir)} has no {RUN_FILE}: not a run directory ({WRITTEN_BY})")
    data = read_json(path, fix=f"not a run directory ({WRITTEN_BY})")
    if data.get("schema") != RUN_SCHEMA:
        raise MoeifyError(f"{path} is not a moeify run file (schema {data.get('schema')!r}, not {RUN_SCHEMA!r})")
    if data.get("version") != RUN_VERSION:
        raise MoeifyError(f"{path} has version {data.get('version')!r}; this moeify reads version {RUN_VERSION}")
    fields = {**OPTIONAL, **{k: v for k, v in data.items() if k not in ("schema", "version")}}
    missing, unknown = sorted(_TYPES.keys() - fields.keys()), sorted(fields.keys() - _TYPES.keys())
    if missing or unknown:
        parts = [f"{kind} {', '.join(keys)}" for kind, keys in (("missing", missing), ("unknown", unknown)) if keys]
        raise MoeifyError(f"{path}: " + "; ".join(parts))
    problem = _problem(fields)
    if problem:
        raise MoeifyError(f"{path}: {problem}")
    return RunInfo(**fields)


@dataclass(frozen=True)
class Run:
    path: Path
    info: RunInfo
    metrics: Metrics


def read_run(run_dir: str | Path) -> Run:
    """A run directory's run.json and metrics.csv, checked."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise MoeifyError(f"{run_dir} does not exist: pass a run directory ({WRITTEN_BY})")
    if not run_dir.is_dir():
        raise MoeifyError(f"{run_dir} is not a directory: pass a run directory ({WRITTEN_BY})")
    return Run(run_dir, read_run_info(run_dir), read_metrics(run_dir))
