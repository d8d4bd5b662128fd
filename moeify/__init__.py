"""moeify: compile dense transformers into Switch Transformer mixture-of-experts models."""
from moeify.checkpoint.store import load, save
from moeify.checkpoint.summary import summarize
from moeify.config import MoEConfig
from moeify.conversion.pipeline import ConversionRecord, convert
from moeify.errors import MoeifyError, NoMatchError
from moeify.layers import SwitchFFN
from moeify.layers.collector import RouterLosses, router_losses

__version__ = "0.1.0"
__all__ = ["MoEConfig", "MoeifyError", "NoMatchError", "SwitchFFN", "RouterLosses", "router_losses",
           "ConversionRecord", "convert", "summarize", "load", "save", "__version__"]
