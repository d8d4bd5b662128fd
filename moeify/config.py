"""MoEConfig: what to convert and how the Switch layers route, validated on creation."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from moeify.errors import MoeifyError

INIT_METHODS = ("upcycle", "random")
ROUTER_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class MoEConfig:
    """Every knob of a conversion. Defaults follow the Switch Transformers paper."""

    num_experts: int = 8  # experts per converted FFN
    every: int = 2  # convert one FFN in `every` within each stack (paper: every other layer)
    offset: int = 1  # ...starting at this index: layers 1, 3, 5 as in the paper's code
    layers: str | None = None  # regex over site names; overrides every/offset when given
    init: str = "upcycle"  # "upcycle": experts copy the dense FFN; "random": paper init
    init_scale: float = 0.1  # paper: truncated normal, std = sqrt(init_scale / fan_in)
    upcycle_noise: float = 0.0  # relative noise added to upcycled experts; 0 keeps them exact
    seed: int = 0  # seeds the router and any random expert init
    capacity_factor: float = 1.25  # training capacity factor (paper: 1.0-1.25)
    eval_capacity_factor: float = 2.0  # more slack at eval time, when drops hurt quality
    min_capacity: int = 4  # keeps tiny batches from dropping nearly every token
    aux_loss_coef: float = 1e-2  # alpha of the load-balancing loss (paper: 1e-2)
    z_loss_coef: float = 1e-3  # router z-loss (ST-MoE); 0 turns it off
    jitter: float = 0.0  # multiplicative router input noise in training; off by default
    expert_dropout: float | None = None  # dropout inside experts; None keeps the dense FFN's rate
    router_dtype: str = "float32"  # selective precision: the router never runs in bf16/fp16

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise MoeifyError(msg)

        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            fail(f"--experts must be a positive integer, got {self.num_experts}: try --experts 8")
        if not isinstance(self.every, int) or self.every < 1:
            fail(f"--every must be >= 1, got {self.every}: use --every 1 to convert every FFN")
        if not isinstance(self.offset, int) or self.offset < 0:
            fail(f"--offset must be >= 0, got {self.offset}")
        if self.layers is not None:
            try:
                re.compile(self.layers)
            except re.error as e:
                fail(f"--layers is not a valid regular expression ({e}): fix the pattern {self.layers!r}")
        if self.init not in INIT_METHODS:
            fail(f"--init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")
        for name in ("capacity_factor", "eval_capacity_factor", "init_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                flag = "--" + name.replace("_", "-")
                fail(f"{flag} must be > 0, got {value}: the paper uses 1.0-2.0 for capacity factors")
        if not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            fail(f"--min-capacity must be >= 0, got {self.min_capacity}")
        for name in ("aux_loss_coef", "z_loss_coef", "jitter", "upcycle_noise"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.jitter >= 1:
            fail(f"jitter must be < 1 (it scales inputs by U(1-j, 1+j)), got {self.jitter}")
        if self.expert_dropout is not None and not 0 <= self.expert_dropout < 1:
            fail(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if self.router_dtype not in ROUTER_DTYPES:
            fail(f"router_dtype must be one of {', '.join(ROUTER_DTYPES)}, got {self.router_dtype!r}")

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoeifyError(f"unknown MoE config keys {unknown}: this file was written by a newer moeify")
        return cls(**data)


@dataclass(frozen=True)
class RoutingConfig:
    """The part of MoEConfig a SwitchFFN needs at run time."""

    num_experts: int
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    jitter: float = 0.0
    router_dtype: str = "float32"

    @classmethod
    def from_moe(cls, config: MoEConfig) -> "RoutingConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.to_dict().items() if k in names})


__all__ = ["MoEConfig", "RoutingConfig", "INIT_METHODS"]
