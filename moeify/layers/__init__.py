"""The Switch layer: router, capacity dispatch, stacked experts, and their losses."""
from .experts import Experts, grouped_linear
from .router import Router, RouterOutput
from .switch import SwitchFFN

__all__ = ["Experts", "Router", "RouterOutput", "SwitchFFN", "grouped_linear"]
