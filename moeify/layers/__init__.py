"""The Switch layer: router, capacity dispatch, stacked experts, and their losses."""
from moeify.layers.experts import Experts
from moeify.layers.kernels import grouped_linear
from moeify.layers.router import Router, RouterOutput
from moeify.layers.switch import SwitchFFN

__all__ = ["Experts", "Router", "RouterOutput", "SwitchFFN", "grouped_linear"]
