"""MoEConfig: what to convert and how the Switch layers route, validated on creation.

Every default lives here once. RoutingConfig holds the routing defaults; MoEConfig takes them
from it; the CLI's help texts and defaults are generated from the fields' `help` metadata.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from moeify.errors import MoeifyError, opt

INIT_METHODS = ("upcycle", "random", "moefy")
ROUTER_INITS = ("random", "hidden")
ROUTER_DTYPES = ("float32", "float64", "bfloat16")
KERNELS = ("auto", "reference", "cpu", "cuda")  # moeify.layers.kernels: the backends of the experts' GEMMs


def option_field(default: Any, help: str) -> Any:
    """A dataclass field with its `help`: the CLI generates the flag, its help and shown default from it."""
    return field(default=default, metadata={"help": help})


@functools.lru_cache(maxsize=64)  # a layer asks every forward, and Fraction takes ~10 us
def decimal_ratio(x: float) -> tuple[int, int]:
    """(p, q) with p / q the decimal a factor was written as: 1.1 is 11/10, not 1.1000000000000000888."""
    ratio = Fraction(repr(float(x)))
    return ratio.numerator, ratio.denominator


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int,
                    top_k: int = 1) -> int:
    """Slots per expert: max(min_capacity, ceil(capacity_factor * top_k * tokens / experts)), as in the
    paper (top_k = 1) and GShard (each token's k choices all need slots).

    Computed exactly on the factor's decimal value, in integers: in floats 1.1 * 100 / 10 is
    11.000000000000002, and its ceiling would give one slot too many.
    """
    p, q = decimal_ratio(capacity_factor)
    return max(min_capacity, -(-p * top_k * num_tokens // (q * num_experts)))


@dataclass(frozen=True)
class RoutingConfig:
    """What a Switch layer needs at run time: its experts, capacity and router losses."""

    num_experts: int = option_field(8, "experts per converted FFN")
    top_k: int = option_field(1, "experts per token (Switch: 1); k > 1 keeps the k most probable, "
                                 "as GShard and Mixtral")
    normalize_gates: bool = option_field(False, "renormalise the k kept probabilities to sum to 1 (Mixtral); off: "
                                                "gate = probability, as in the Switch paper")
    dropless: bool = option_field(False, "no capacity limit: every token reaches its experts (MegaBlocks, Mixtral); "
                                         "capacity factors are then ignored")
    capacity_factor: float = option_field(1.25, "training capacity factor (paper: 1.0-1.25)")
    eval_capacity_factor: float = option_field(2.0, "evaluation capacity factor: more slack when drops hurt quality")
    min_capacity: int = option_field(4, "minimum slots per expert, so tiny batches do not drop nearly every token")
    aux_loss_coef: float = option_field(1e-2, "alpha of the load-balancing loss (paper: 1e-2)")
    z_loss_coef: float = option_field(1e-3, "router z-loss coefficient (ST-MoE); 0 turns it off")
    jitter: float = option_field(0.0, "multiplicative router input noise U(1-j, 1+j) in training; 0 is off")
    router_dtype: str = option_field("float32", "the router's dtype: float32 is the paper's selective precision; "
                                                "bfloat16 is there to measure what that buys")
    kernel: str = option_field("auto", "the experts' grouped GEMMs: reference (a plain loop, the oracle), cpu "
                                       "(batched bmm), cuda (grouped_mm); auto: cuda on CUDA, else cpu")

    def capacity(self, num_tokens: int, training: bool) -> int | None:
        """Slots per expert for a batch of `num_tokens`, with the train or eval capacity factor;
        None when dropless (the busiest expert's count is then the size of the batch's buffers)."""
        if self.dropless:
            return None
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return expert_capacity(num_tokens, self.num_experts, factor, self.min_capacity, self.top_k)

    @classmethod
    def from_moe(cls, config: "MoEConfig") -> "RoutingConfig":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


_R = {f.name: f for f in dataclasses.fields(RoutingConfig)}


def _routing(name: str) -> Any:
    """MoEConfig's copy of a RoutingConfig field: the same default and help, written once."""
    return field(default=_R[name].default, metadata=_R[name].metadata)


@dataclass(frozen=True)
class MoEConfig:
    """Every knob of a conversion. Defaults follow the Switch Transformers paper."""

    num_experts: int = _routing("num_experts")
    top_k: int = _routing("top_k")
    normalize_gates: bool = _routing("normalize_gates")
    dropless: bool = _routing("dropless")
    every: int = option_field(2, "convert one FFN in EVERY within each stack (paper: every other layer)")
    offset: int | None = option_field(None, "index of the first converted FFN in each stack; unset means EVERY - 1, "
                                            "the last of each group (EVERY 2: FFNs 1, 3, 5, ... as in the paper)")
    layers: str | None = option_field(None, "regex (re.search) over the dense FFN module names; overrides every/offset")
    init: str = option_field("upcycle", "upcycle: experts copy the dense FFN; random: the paper's truncated normal; "
                                        "moefy: each expert is one of E balanced clusters of the FFN's neurons "
                                        "(d_ff / E wide, MoEfication)")
    init_scale: float = option_field(0.1, "random init: truncated normal with std sqrt(init_scale / fan_in) "
                                          "(paper: 0.1)")
    upcycle_noise: float = option_field(0.0, "relative noise added to upcycled experts; 0 keeps them exact copies")
    upcycle_scale: str | float = option_field(
        "none", "multiply upcycled experts' outputs by this: none, auto (E / k for gate = probability, 1 for "
                "renormalised gates: a fresh layer then starts near the dense FFN) or a positive number")
    router_init: str = option_field("random", "random: the paper's truncated normal; hidden: router rows are the "
                                              "normalised k-means centroids of each site's inputs on calibration text")
    text: str | None = option_field(None, "UTF-8 calibration text file for --router-init hidden and --init moefy's "
                                          "report; unset: the Python standard library's source")
    seed: int = option_field(0, "seeds the router, any random expert init and a preset's random weights")
    capacity_factor: float = _routing("capacity_factor")
    eval_capacity_factor: float = _routing("eval_capacity_factor")
    min_capacity: int = _routing("min_capacity")
    aux_loss_coef: float = _routing("aux_loss_coef")
    z_loss_coef: float = _routing("z_loss_coef")
    jitter: float = _routing("jitter")
    expert_dropout: float | None = option_field(None, "dropout inside experts; unset keeps the dense FFN's rate")
    router_dtype: str = _routing("router_dtype")
    kernel: str = _routing("kernel")

    def __post_init__(self) -> None:
        def fail(name: str, problem: str, fix: str = "") -> None:
            if not fix:  # the default is a value that always works
                default = next(f.default for f in dataclasses.fields(self) if f.name == name)
                fix = "leave it unset" + (f" for {opt(name, default)}, the default" if default is not None else "")
            raise MoeifyError(f"{opt(name)} {problem}: {fix}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, f"must be a finite number, got {value!r}")
            return value

        for name in ("num_experts", "top_k", "every", "offset", "min_capacity", "seed"):
            value = getattr(self, name)
            if (value is not None or name != "offset") and (isinstance(value, bool) or not isinstance(value, int)):
                fail(name, f"must be an integer, got {value!r}")
        if self.num_experts < 1:
            fail("num_experts", f"must be a positive integer, got {self.num_experts}", f"try {opt('num_experts', 8)}")
        if not 1 <= self.top_k <= self.num_experts:
            fail("top_k", f"must be between 1 and the {self.num_experts} experts, got {self.top_k}",
                 f"try {opt('top_k', min(2, self.num_experts))}")
        for name in ("normalize_gates", "dropless"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"must be True or False, got {getattr(self, name)!r}")
        if self.every < 1:
            fail("every", f"must be >= 1, got {self.every}", f"use {opt('every', 1)} to convert every FFN")
        if self.offset is not None and self.offset < 0:
            fail("offset", f"must be >= 0, got {self.offset}", "it is the index of the first converted FFN")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except (re.error, TypeError) as e:
                fail("layers", f"is not a valid regular expression ({e})", f"fix the pattern {self.layers!r}")
        if self.init not in INIT_METHODS:
            fail("init", f"must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")
        self.upcycle_factor  # validates upcycle_scale
        if self.upcycle_scale != "none" and self.init != "upcycle":
            fail("upcycle_scale", f"scales upcycled experts, but {opt('init', self.init)} does not upcycle",
                 f"drop {opt('upcycle_scale')} or use {opt('init', 'upcycle')}")
        if self.router_init not in ROUTER_INITS:
            fail("router_init", f"must be one of {', '.join(ROUTER_INITS)}, got {self.router_init!r}")
        if self.router_init == "hidden" and self.init == "moefy":
            fail("router_init", f"hidden does not apply to {opt('init', 'moefy')}, whose router starts from "
                                "its neuron clusters' centroids", f"drop {opt('router_init')}")
        if self.text is not None and not isinstance(self.text, str):
            fail("text", f"must be a file path, got {self.text!r}")
        if self.text is not None and self.router_init != "hidden" and self.init != "moefy":
            fail("text", f"is read only by {opt('router_init', 'hidden')} and {opt('init', 'moefy')}",
                 f"drop {opt('text')} or add {opt('router_init', 'hidden')}")
        for name in ("capacity_factor", "eval_capacity_factor", "init_scale"):
            if number(name) <= 0:
                fail(name, f"must be > 0, got {getattr(self, name)}", "the paper uses 1.0-2.0 for capacity factors")
        if self.min_capacity < 0:
            fail("min_capacity", f"must be >= 0, got {self.min_capacity}")
        for name in ("aux_loss_coef", "z_loss_coef", "jitter", "upcycle_noise"):
            if number(name) < 0:
                fail(name, f"must be >= 0, got {getattr(self, name)}")
        if self.jitter >= 1:
            fail("jitter", f"must be < 1 (it scales inputs by U(1-j, 1+j)), got {self.jitter}")
        if self.expert_dropout is not None and not 0 <= number("expert_dropout") < 1:
            fail("expert_dropout", f"must be in [0, 1), got {self.expert_dropout}")
        if self.router_dtype not in ROUTER_DTYPES:
            fail("router_dtype", f"must be one of {', '.join(ROUTER_DTYPES)}, got {self.router_dtype!r}")
        if self.kernel not in KERNELS:
            fail("kernel", f"must be one of {', '.join(KERNELS)}, got {self.kernel!r}")

    @property
    def first(self) -> int:
        """Index of the first converted FFN in each stack (what an unset offset means: every - 1)."""
        return self.every - 1 if self.offset is None else self.offset

    @property
    def reads_text(self) -> bool:
        """Whether converting routes calibration text through the dense model (else nothing is run)."""
        return self.router_init == "hidden" or self.init == "moefy"

    @property
    def upcycle_factor(self) -> float:
        """What upcycling multiplies each expert's output by (upcycle_scale as a number).

        auto: a fresh router gives every expert a probability near 1/E, so with gate = probability a
        token's k kept copies of the FFN sum to about k/E of it, and E/k restores it; renormalised
        gates already sum to 1 (He et al., 2024, "Upcycling Large Language Models into MoE").
        """
        value = self.upcycle_scale
        if value == "none":
            return 1.0
        if value == "auto":
            return 1.0 if self.normalize_gates else self.num_experts / self.top_k
        try:  # "2.5" from the command line, 2.5 from Python
            factor = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            factor = math.nan
        if not (math.isfinite(factor) and factor > 0):
            raise MoeifyError(f"{opt('upcycle_scale')} must be none, auto or a positive number, got {value!r}: "
                              f"try {opt('upcycle_scale', 'auto')}")
        return factor

    @property
    def routing(self) -> RoutingConfig:
        """The run-time part every converted layer keeps."""
        return RoutingConfig.from_moe(self)

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        if not isinstance(data, dict):
            raise MoeifyError(f"the MoE config must be a JSON object, got {type(data).__name__}: re-run `moeify convert`")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoeifyError(f"unknown MoE config keys {unknown}: this file was written by a newer moeify")
        return cls(**data)


__all__ = ["MoEConfig", "RoutingConfig", "INIT_METHODS", "ROUTER_DTYPES", "ROUTER_INITS", "expert_capacity",
           "decimal_ratio"]
