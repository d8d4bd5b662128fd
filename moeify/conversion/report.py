"""InitReport: what a data-driven initialisation measured at one Switch layer (torch-free, stored in moeify.json)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InitReport:
    """Measured on the calibration text's hidden states at the layer, right after initialisation."""

    tokens: int  # calibration tokens that reached the layer
    load_cv: float  # std / mean of assignments per expert with the layer's router as initialised
    random_load_cv: float  # the same with the paper's random router (--router-init random), same tokens
    top1_error: float | None = None  # moefy: ||y - y_dense|| / ||y_dense||, each token's top-1 expert at gate 1
    top2_error: float | None = None  # moefy: the same with its two most probable experts, gates 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InitReport":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
