"""moeify: compile dense transformers into Switch Transformer mixture-of-experts models.

The public names below are imported on first use (PEP 562), so that `import moeify.cli` and
`moeify --help` do not pay for torch and transformers.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "load": "moeify.checkpoint.store",
    "save": "moeify.checkpoint.store",
    "summarize": "moeify.checkpoint.summary",
    "MoEConfig": "moeify.config",
    "ConversionRecord": "moeify.conversion.pipeline",
    "convert": "moeify.conversion.pipeline",
    "MoeifyError": "moeify.errors",
    "NoMatchError": "moeify.errors",
    "SwitchFFN": "moeify.layers",
    "RouterLosses": "moeify.layers.collector",
    "router_losses": "moeify.layers.collector",
}

__all__ = ["ConversionRecord", "MoEConfig", "MoeifyError", "NoMatchError", "RouterLosses", "SwitchFFN", "__version__",
           "convert", "load", "router_losses", "save", "summarize"]

if TYPE_CHECKING:
    from moeify.checkpoint.store import load, save
    from moeify.checkpoint.summary import summarize
    from moeify.config import MoEConfig
    from moeify.conversion.pipeline import ConversionRecord, convert
    from moeify.errors import MoeifyError, NoMatchError
    from moeify.layers import SwitchFFN
    from moeify.layers.collector import RouterLosses, router_losses


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moeify' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
