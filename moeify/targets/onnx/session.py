"""onnxruntime sessions on the execution provider the user asked for, or a clear reason why not."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from moeify.errors import MoeifyError

EXECUTION_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf stops at 2 GiB: above this, weights go to a side file


def execution_providers(provider: str) -> list[str]:
    """onnxruntime's provider list for `provider`, checked before any work is done."""
    name = EXECUTION_PROVIDERS.get(provider)
    if name is None:
        raise MoeifyError(f"--provider must be one of {', '.join(EXECUTION_PROVIDERS)}, got {provider!r}")
    if name not in ort.get_available_providers():
        raise MoeifyError(f"--provider {provider} needs onnxruntime-gpu, but this onnxruntime "
                          f"({ort.__version__}) only has {', '.join(ort.get_available_providers())}: "
                          "pip uninstall -y onnxruntime && pip install 'moeify[gpu]'")
    return [name] if provider == "cpu" else [name, "CPUExecutionProvider"]


def session(model: str | Path | bytes, provider: str = "cpu", *, level: str = "all",
            save_to: Path | None = None, threads: int = 0, spinning: bool = True) -> ort.InferenceSession:
    """An InferenceSession; with `save_to`, onnxruntime also writes the graph it optimised.

    spinning=False stops idle worker threads from busy-waiting, which would steal the cores
    from whatever runs next (PyTorch, in an interleaved benchmark).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3  # errors only: the hardware-specific-layout notice is expected
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
        size = Path(model).stat().st_size if not isinstance(model, bytes) else len(model)
        if size > EXTERNAL_DATA_BYTES:
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             f"{save_to.name}.data")
    source = model if isinstance(model, bytes) else str(model)
    providers = execution_providers(provider)
    if provider == "cpu":
        return ort.InferenceSession(source, options, providers=providers)
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as e:  # onnxruntime-gpu installed but no usable GPU or CUDA libraries
        raise MoeifyError(f"onnxruntime cannot start the {provider} provider: {str(e).splitlines()[0]}") from None
