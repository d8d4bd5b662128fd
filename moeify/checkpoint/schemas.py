"""The schema of every JSON file moeify reads, and validate(): one line naming file, JSON path, expectation and fix.

Hand-written, not pydantic: strict types ("8" is no integer), these exact messages, no import time or dependency.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from typing import Any

from moeify.checkpoint.records import ModelSummary, SwitchLayerRecord
from moeify.config import KERNELS, ROUTER_DTYPES, MoEConfig, RoutingConfig
from moeify.conversion.report import InitReport
from moeify.errors import MoeifyError

_MISSING = object()


class _Bad(Exception):
    """A problem at JSON path `at`; `whole` problems (another kind of file, another version) describe the file."""

    def __init__(self, at: str, problem: str, whole: bool = False) -> None:
        super().__init__(at, problem)
        self.at, self.problem, self.whole = at, problem, whole


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _join(at: str, key: str) -> str:
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{at}.{key}" if at else key
    return f"{at}[{json.dumps(key)}]"


class Spec:
    expected = "a value"

    def ok(self, value: Any) -> bool:
        return True

    def check(self, value: Any, at: str) -> None:
        if not self.ok(value):
            raise _Bad(at, f"must be {self.expected}, got {_show(value)}")


class Int(Spec):
    def __init__(self, min: int | None = None) -> None:
        self.min = min

    @property
    def expected(self) -> str:
        return "an integer" if self.min is None else f"an integer >= {self.min}"

    def ok(self, value: Any) -> bool:  # bool is an int in Python, not in JSON
        return type(value) is int and (self.min is None or value >= self.min)


class Num(Spec):
    def __init__(self, min: float | None = None, *, above: float | None = None, max: float | None = None) -> None:
        self.min, self.above, self.max = min, above, max  # above: strictly

    @property
    def expected(self) -> str:
        bounds = [f">= {self.min}"] * (self.min is not None) + [f"> {self.above}"] * (self.above is not None) + \
            [f"<= {self.max}"] * (self.max is not None)
        return "a finite number" + (" " + " and ".join(bounds) if bounds else "")

    def ok(self, value: Any) -> bool:
        return (type(value) in (int, float) and math.isfinite(value) and (self.min is None or value >= self.min)
                and (self.above is None or value > self.above) and (self.max is None or value <= self.max))


class Str(Spec):
    def __init__(self, choices: tuple[str, ...] = (), *, pattern: str = "", what: str = "") -> None:
        self.choices, self.pattern, self.what = choices, pattern, what  # what: how to say what `pattern` matches

    @property
    def expected(self) -> str:
        return self.what or (f"one of {', '.join(self.choices)}" if self.choices else "a string")

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and (not self.choices or value in self.choices) and \
            (not self.pattern or re.fullmatch(self.pattern, value) is not None)


class Bool(Spec):
    expected = "true or false"

    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)


class Tag(Spec):
    """The key that says what kind of file this is: another value means another kind of file."""

    def __init__(self, value: str, kind: str) -> None:
        self.value, self.kind = value, kind

    def check(self, value: Any, at: str) -> None:
        if value != self.value:
            found = f'no "{at}" key' if value is _MISSING else f'"{at}" is {_show(value)}, not {_show(self.value)}'
            raise _Bad(at, f"is not {self.kind} ({found})", whole=True)


class Version(Spec):
    def __init__(self, value: int) -> None:
        self.value = value

    def check(self, value: Any, at: str) -> None:
        if value is _MISSING or type(value) is not int or value != self.value:
            words = at.replace("_", " ")
            found = f"has no {words}" if value is _MISSING else f"has {words} {_show(value)}"
            raise _Bad(at, f"{found}, this moeify reads {self.value}", whole=True)


class Either(Spec):
    """Any of `options`; a problem inside one that fits better (deeper than `at`) is the one reported."""

    def __init__(self, *options: Spec) -> None:
        self.options = options

    @property
    def expected(self) -> str:
        return " or ".join(o.expected for o in self.options)

    def check(self, value: Any, at: str) -> None:
        deepest = None
        for option in self.options:
            try:
                return option.check(value, at)
            except _Bad as bad:
                deepest = bad if bad.at != at else deepest
        raise deepest or _Bad(at, f"must be {self.expected}, got {_show(value)}")


class Null(Spec):
    expected = "null"

    def ok(self, value: Any) -> bool:
        return value is None


NULL = Null()


def nullable(spec: Spec) -> Spec:
    return Either(spec, NULL)


class List(Spec):
    def __init__(self, item: Spec, *, nonempty: bool = False) -> None:
        self.item, self.nonempty = item, nonempty
        self.expected = "a non-empty array" if nonempty else "an array"

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, list) or (self.nonempty and not value):
            raise _Bad(at, f"must be {self.expected}, got {_show(value)}")
        for i, x in enumerate(value):
            self.item.check(x, f"{at}[{i}]")


class Map(Spec):
    """An object whose keys are names (of layers, files, experts) and whose values are all `value`."""

    expected = "an object"

    def __init__(self, value: Spec, key: Str | None = None) -> None:
        self.value, self.key = value, key or Str()

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict):
            raise _Bad(at, f"must be an object, got {_show(value)}")
        for k, v in value.items():
            if not self.key.ok(k):
                raise _Bad(_join(at, k), f"is not {self.key.expected}")
            self.value.check(v, _join(at, k))


class Obj(Spec):
    """An object with `required` and `optional` keys; any other key is refused unless `other` types it."""

    expected = "an object"

    def __init__(self, required: dict[str, Spec], optional: dict[str, Spec] | None = None, *,
                 other: Spec | None = None, one_of: tuple[str, ...] = ()) -> None:
        self.required, self.optional, self.other = required, optional or {}, other
        self.one_of = one_of  # exactly one of these optional keys

    def check(self, value: Any, at: str) -> None:
        if not isinstance(value, dict):
            raise _Bad(at, f"must be an object, got {_show(value)}")
        specs = {**self.required, **self.optional}
        # A file's kind and version first: another kind or version explains every other difference.
        for key in sorted(specs, key=lambda k: not isinstance(specs[k], (Tag, Version))):
            if key in value:
                specs[key].check(value[key], _join(at, key))
            elif key in self.required:
                if not isinstance(specs[key], (Tag, Version)):
                    raise _Bad(_join(at, key), "is missing")
                specs[key].check(_MISSING, _join(at, key))
        if self.one_of and sum(k in value for k in self.one_of) != 1:
            raise _Bad(at, f"must have exactly one of {' or '.join(self.one_of)}")
        for key in [k for k in value if k not in specs]:
            if self.other is None:
                close = difflib.get_close_matches(key, list(specs), n=1)
                raise _Bad(_join(at, key), "is an unknown key" + (f" (did you mean {close[0]}?)" if close else ""))
            self.other.check(value[key], _join(at, key))


ANY = Spec()
ANY_OBJECT = Obj({}, other=ANY)


def fields_of(cls: type, *, extra: dict[str, Spec] | None = None, **override: Spec) -> Obj:
    """The object a dataclass is written as: its fields' annotations (int, float, bool, str, `A | None`) or
    `override`; fields with defaults are optional, since files written before a field existed lack it."""
    scalars = {"int": Int(), "float": Num(), "bool": Bool(), "str": Str()}
    required, optional = {}, dict(extra or {})
    for f in dataclasses.fields(cls):
        if f.name in override:
            spec = override[f.name]
        else:
            parts = [p.strip() for p in str(f.type).split("|")]
            options = tuple(NULL if p == "None" else scalars[p] for p in parts)
            spec = options[0] if len(options) == 1 else Either(*options)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        (optional if has_default else required)[f.name] = spec
    return Obj(required, optional)


# Counts and ranges the dataclasses do not check themselves (RoutingConfig checks nothing).
ROUTING_LIMITS = dict(num_experts=Int(1), top_k=Int(1), min_capacity=Int(0), capacity_factor=Num(above=0),
                      eval_capacity_factor=Num(above=0), aux_loss_coef=Num(0), z_loss_coef=Num(0),
                      jitter=Num(0, max=1), router_dtype=Str(ROUTER_DTYPES), kernel=Str(KERNELS))
MOE_CONFIG = fields_of(MoEConfig, **ROUTING_LIMITS, every=Int(1), offset=nullable(Int(0)))
LAYER_RECORD = fields_of(
    SwitchLayerRecord, routing=fields_of(RoutingConfig, **ROUTING_LIMITS), d_model=Int(1), d_ff=Int(1),
    params_per_expert=Int(0), experts_held=Int(0), router_params=Int(0),
    init_report=nullable(fields_of(InitReport, tokens=Int(0))),
    extra={"num_experts": Int(1), "expert_params": Int(0)})  # derived, written for JSON readers
SUMMARY = fields_of(ModelSummary, moe_layers=List(LAYER_RECORD), total_params=Int(0), active_params=Int(0),
                    dense_params=Int(0), num_experts=Int(0), ffn_layers=Int(0))
# How to rebuild the dense model: the keys moeify's loaders write are typed; convert(source=...) takes any dict.
SOURCE = Obj({}, {"kind": Str(), "path": Str(), "architecture": Str(), "name": Str(), "seed": Int(), "class": Str(),
                  "imported": Str(), "expert_capacity": Int(0)}, other=ANY)
RANKS = List(List(Int(0)))
SHA256 = Str(pattern="[0-9a-f]{64}", what="a sha256 hex digest")
# Readers join these to the export directory: a path could point outside it.
FILE_NAME = Str(pattern=r"(?!\.\.?$)[^/\\]+", what="a file name in the export directory")
# A file anywhere below the directory, in POSIX form: no absolute path, no "." or ".." part.
RELATIVE_PATH = Str(pattern=r"(?!(?:.*/)?\.\.?(?:/|$))(?:[^/\\]+/)*[^/\\]+", what="a path inside the directory")
NUMBER = Num(0)


# What each file says it is, and the version this moeify reads; the writers take them from here.
MOEIFY_FORMAT, MOEIFY_VERSION = "moeify", 3
PLAN_SCHEMA, PLAN_VERSION = "moeify.plan", 1
LOAD_SCHEMA, LOAD_VERSION = "moeify.load", 1
MANIFEST_FORMAT, MANIFEST_VERSION = "moeify.distributed", 1
INTEGRITY_FORMAT, INTEGRITY_VERSION = "moeify.manifest", 1


class Schema:
    def __init__(self, root: Obj, fix: str) -> None:
        self.root, self.fix = root, fix  # fix: what to do about any problem the schema finds


SCHEMAS = {
    "moeify.json": Schema(Obj({
        "format": Tag(MOEIFY_FORMAT, "a moeify model's metadata"), "format_version": Version(MOEIFY_VERSION),
        "weights": Bool(), "source": SOURCE, "dense_config": nullable(ANY_OBJECT), "moe_config": MOE_CONFIG,
        "sites": List(Str()), "skipped": List(Str()), "summary": SUMMARY, "aliases": Map(Str())},
        {"target": Str()}),  # the export it belongs to: a torch-distributed export's copy says so
        "convert the model again with `moeify convert`"),
    # world_size, the mesh's shape and names and both group lists are derived from mesh.ranks: optional.
    "plan.json": Schema(Obj({
        "schema": Tag(PLAN_SCHEMA, "a moeify sharding plan"), "version": Version(PLAN_VERSION),
        "mesh": Obj({"ranks": RANKS}, {"shape": List(Int(0)), "dim_names": List(Str())}),
        "layout": Str(("contiguous", "strided")),
        "layers": List(Obj({"name": Str(), "num_experts": Int(1), "placement": List(Int(0)),
                            "all_to_all": Str(("flat", "hierarchical"))},
                           {"replicas": Map(List(Int(0)), key=Str(pattern=r"\d+", what="an expert id")),
                            "all_to_all_ms": NUMBER, "lower_bound_ms": NUMBER, "compute_ms": NUMBER}), nonempty=True),
        "estimate": Obj({"step_ms": NUMBER, "all_to_all_ms": NUMBER, "lower_bound_ms": NUMBER, "compute_ms": NUMBER,
                         "allreduce_ms": NUMBER, "memory_per_rank_bytes": Int(0), "memory_limit_bytes": Int(0)},
                        {"busiest_link": List(Str())})},
        {"world_size": Int(1), "expert_parallel_groups": RANKS, "data_parallel_groups": RANKS,
         # What was planned, on what, and the runners-up: shown by `plan` and `inspect`.
         "model": Obj({}, {"name": Str(), "dtype": Str(), "tokens_per_rank": Int(1), "capacity_factor": NUMBER,
                           "top_k": Int(1), "dropless": Bool(), "moe_layers": Int(0), "calibrated": Bool(),
                           "optimizer": Str(), "estimated": Bool(), "how": Str()}),
         "topology": Obj({}, {"name": Str(), "hosts": Int(1), "gpus_per_host": Int(1), "device": Str()}),
         "alternatives": List(Obj({"expert_parallel": Int(1), "data_parallel": Int(1), "layout": Str(),
                                   "all_to_all": List(Str()), "step_ms": NUMBER, "all_to_all_ms": NUMBER,
                                   "lower_bound_ms": NUMBER, "memory_per_rank_bytes": Int(0), "fits": Bool()}))}),
        "regenerate it with `moeify plan`"),
    # `moeify calibrate` writes every key; a hand-written load file needs only each layer's fraction.
    "load.json": Schema(Obj(
        {"schema": Tag(LOAD_SCHEMA, "a `moeify calibrate` load file"),
         "layers": Map(Obj({"fraction": List(Num(0, max=1))},
                           {"tokens": List(Int(0)), "dropped_fraction": Num(0, max=1)}))},
        {"version": Version(LOAD_VERSION), "model": Str(), "tokenizer": Str()}),
        "create it again with `moeify calibrate`"),
    # networkx node-link JSON, as topology.py's docstring and the README describe it; written by hand too.
    # Topology.validate checks the figures' ranges, naming the GPU or link, for GraphML and presets too.
    "topology": Schema(Obj(
        {"nodes": List(Obj({"id": Either(Str(), Int()),
                            "kind": Str(("gpu", "nvswitch", "pcie", "nic", "cpu", "switch"))},
                           {"host": Str(), "local_index": Int(0), "numa": Int(), "device": Str(),
                            "memory_GB": Num(), "peak_TFLOPs": Num(), "port": Str()}))},
        {"directed": Bool(), "multigraph": Bool(), "graph": Obj({}, {"message_overhead_us": Num(0)}),
         **{key: List(Obj({"source": Either(Str(), Int()), "target": Either(Str(), Int()),
                           "bw_GBps": Num()}, {"latency_us": Num(), "link": Str()}))
            for key in ("edges", "links")}},
        one_of=("edges", "links")),
        "fix the file: node-link JSON as the README's \"Planning the sharding\" describes"),
    "manifest.json": Schema(Obj({
        "format": Tag(MANIFEST_FORMAT, "a torch-distributed manifest"), "version": Version(MANIFEST_VERSION),
        "world_size": Int(1), "files": Map(Obj({"sha256": SHA256, "bytes": Int(0)}), key=FILE_NAME),
        "ranks": List(Obj({"rank": Int(0), "file": FILE_NAME, "experts": Map(List(Int(0)))}))},
        {"source": SOURCE}),
        "re-run `moeify export --target torch-distributed`"),
    # Every atomic output directory's files (checkpoint/integrity.py); a directory without one is read unverified.
    "moeify-manifest.json": Schema(Obj({
        "format": Tag(INTEGRITY_FORMAT, "a moeify file manifest"), "version": Version(INTEGRITY_VERSION),
        "files": Map(Obj({"sha256": SHA256, "size": Int(0)}), key=RELATIVE_PATH)}),
        "write the directory again (`moeify convert`/`export`)"),
}


class Table:
    """A CSV file's header: every one of `columns`, then any number of `prefix`ed ones; how each cell parses."""

    def __init__(self, columns: tuple[str, ...], prefix: str, ints: tuple[str, ...], optional: tuple[str, ...]):
        self.columns, self.prefix, self.ints = columns, prefix, ints
        self.optional = optional  # an empty cell here means "not measured": None

    def check_header(self, header: list[str], path: Any) -> None:
        missing = [c for c in self.columns if c not in header]
        if missing:
            raise MoeifyError(f"{path} lacks the columns {', '.join(missing)}")
        unknown = [c for c in header if c not in self.columns and not c.startswith(self.prefix)]
        if unknown:
            raise MoeifyError(f"{path} has unknown columns {', '.join(unknown)}")

    def parse(self, path: Any, line: int, column: str, cell: str) -> float | int | None:
        if cell == "" and column in self.optional:
            return None
        try:  # float() reads nan and inf: a diverged loss is a value, not a damaged file
            return int(cell) if column in self.ints else float(cell)
        except ValueError:
            kind = "an integer" if column in self.ints else "a number"
            raise MoeifyError(f"{path} line {line}, column {column}: {cell!r} is not {kind}") from None


# metrics.csv, one row per logged step (training/runs.py writes it, `compare` reads it); then load_cv/<layer>.
METRICS = Table(columns=("step", "tokens", "wall_seconds", "lr", "train_loss", "val_loss", "aux_loss", "z_loss",
                         "dropped_fraction", "load_cv_mean"), prefix="load_cv/", ints=("step", "tokens"),
                # val_loss is empty between evaluations, the router figures in a dense run.
                optional=("val_loss", "aux_loss", "z_loss", "dropped_fraction", "load_cv_mean"))


def validate(name: str, data: Any, path: Any = None) -> Any:
    """`data` (read from `path`) if it matches the schema of file kind `name`, else a one-line MoeifyError."""
    return check(SCHEMAS[name], data, path if path is not None else name)


def check(schema: Schema, data: Any, where: Any) -> Any:
    """`data` (read from file `where`) if it matches `schema`, else a one-line MoeifyError: for the schemas of files
    that later stages define (training/checkpoints.py's trainer.json, built from the training configs)."""
    try:
        schema.root.check(data, "")
    except _Bad as bad:
        problem = bad.problem if bad.whole else f"{bad.at or 'the top level'} {bad.problem}"
        raise MoeifyError(f"{where}{' ' if bad.whole else ': '}{problem}: {schema.fix}") from None
    return data
