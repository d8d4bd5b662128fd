"""moeify: compile dense transformers into Switch Transformer mixture-of-experts models."""
from .config import MoEConfig
from .errors import MoeifyError, NoMatchError
from .layers import SwitchFFN
from .layers.collector import RouterLosses, router_losses
from .pipeline import ConversionRecord, convert
from .summary import summarize
from .targets.torch_local import load, save

__version__ = "0.1.0"
__all__ = ["MoEConfig", "MoeifyError", "NoMatchError", "SwitchFFN", "RouterLosses", "router_losses",
           "ConversionRecord", "convert", "summarize", "load", "save", "__version__"]
