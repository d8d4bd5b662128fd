"""export_onnx(): a converted model -> .onnx graphs, checked, optimised and compared with PyTorch."""
from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch
from torch import nn

from moeify.checkpoint.files import atomic_directory, check_writable
from moeify.checkpoint.metadata import read_metadata, require_weights
from moeify.checkpoint.store import load
from moeify.errors import MoeifyError
from moeify.targets.onnx import optimize
from moeify.targets.onnx.fold import fold_constants
from moeify.targets.onnx.graphs import Graph, graphs_for, static_sizes
from moeify.targets.onnx.options import OnnxOptions
from moeify.targets.onnx.session import execution_providers, session
from moeify.targets.onnx.trace import trace_graph
from moeify.targets.onnx.unit import LayerLowering, plan_layers
from moeify.targets.onnx.verify import dequantized, max_abs_diff

REPORT_FILE = "moeify_onnx.json"
Progress = Callable[[str, int, int], None]


@dataclass
class GraphReport:
    file: str
    nodes_exported: int  # as torch.onnx wrote it
    nodes: int  # saved: dropout removed, constants folded
    nodes_optimized: int | None  # after onnxruntime's full optimisation for the provider
    moe_nodes: int  # com.microsoft.MoE and QMoE nodes
    megabytes: float
    max_abs_diff: float | None  # against PyTorch eval (dropless where fused), on another batch shape;
    # quantized experts: PyTorch with the same dequantized weights, so that it checks the packing
    max_abs_diff_float: float | None = None  # quantized experts: against the float model, the quantization error


@dataclass
class ExportReport:
    out: Path
    options: OnnxOptions
    layers: list[LayerLowering]
    graphs: list[GraphReport] = field(default_factory=list)
    generation: dict | None = None  # transformers models: the token ids generate.py needs

    @property
    def fallbacks(self) -> list[LayerLowering]:
        """Layers that fused mode left portable, each with its reason."""
        return [p for p in self.layers if p.reason]

    def to_dict(self) -> dict:
        return {"options": asdict(self.options),
                "layers": [_layer_dict(p) for p in self.layers],
                "graphs": [asdict(g) for g in self.graphs],
                **({"generation": self.generation} if self.generation else {})}


def _layer_dict(plan: LayerLowering) -> dict:
    s = plan.spec
    return {"name": s.name, "lowering": plan.lowering, "activation": s.activation.name, "gated": s.gated,
            "num_experts": s.num_experts, "top_k": s.top_k, "normalize_gates": s.normalize_gates,
            "dropless": s.dropless, "eval_capacity_factor": s.eval_capacity_factor,
            "min_capacity": s.min_capacity, "activation_type": plan.activation_type, "reason": plan.reason,
            **({"weight_bits": plan.quantized.bits} if plan.quantized else {})}


def generation_ids(model: nn.Module) -> dict | None:
    """decoder_start, eos and pad token ids, as model.generate() would take them; None for custom modules."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "vocab_size", None):
        return None
    gen = getattr(model, "generation_config", None)

    def pick(key: str):
        value = getattr(gen, key, None)
        return value if value is not None else getattr(config, key, None)

    return {key: pick(key) for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id")}


def load_for_export(path: Path) -> nn.Module:
    """A moeify output directory as an eval-mode model, or a one-line reason it cannot be exported."""
    meta = read_metadata(path)
    require_weights(path, meta, "exporting it to ONNX")
    if meta["source"].get("architecture") is None:
        raise MoeifyError(f"{path} holds a converted custom module: export it from Python with "
                          "moeify.targets.onnx.export_onnx(model, out, example_inputs=(x,))")
    return load(path).eval()


def half_precision(model: nn.Module) -> nn.Module:
    """An fp16 copy; its routers keep their float32 weights (Router holds its dtype through .half())."""
    return copy.deepcopy(model).half().eval()


def export_onnx(source: nn.Module | str | Path, out: str | Path, options: OnnxOptions | None = None, *,
                example_inputs: tuple[torch.Tensor, ...] | None = None, force: bool = False,
                progress: Progress | None = None) -> ExportReport:
    """Export a moeify model (or output directory) to ONNX in `out`; atomically, never half-written.

    Encoder-decoder models give encoder_model.onnx and decoder_model.onnx (and decoder_with_past_model.onnx
    with options.with_past); others model.onnx.
    Custom modules need `example_inputs`. Returns what was written, node counts and parity. A directory's files
    are checked against its moeify-manifest.json as they load (moeify.load; pass a model loaded with verify=False
    to skip that).
    """
    options = options or OnnxOptions()
    out = Path(out)
    execution_providers(options.provider)  # fail before any work
    check_writable(out, force)
    reference = load_for_export(Path(source)) if isinstance(source, (str, Path)) else source.eval()
    exported = half_precision(reference) if options.dtype == "fp16" else reference
    plans = plan_layers(exported, options.mode, options.quantize)
    references = graphs_for(reference, example_inputs, options.with_past)
    graphs = references if exported is reference else graphs_for(exported, _half_inputs(example_inputs),
                                                                  options.with_past)
    report = ExportReport(out, options, plans, generation=generation_ids(reference))
    # The scratch folder lies inside the output's temporary: a SIGKILL leaves it where the next export to `out`
    # removes it (clean_leftovers), and it is gone before the manifest and the rename.
    with atomic_directory(out, force=force) as tmp, tempfile.TemporaryDirectory(dir=tmp) as scratch:
        job = _Job(options, exported, reference, plans, tmp, Path(scratch))
        for i, (graph, ref) in enumerate(zip(graphs, references)):
            report.graphs.append(job.export(graph, ref))
            if progress:
                progress("export", i + 1, len(graphs))
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _half_inputs(example_inputs: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    if example_inputs is None:
        return None
    return tuple(t.half() if t.is_floating_point() else t for t in example_inputs)


@dataclass
class _Job:
    """One export: `exported` is traced (fp16 copy or the model), `reference` is what parity compares with."""

    options: OnnxOptions
    exported: nn.Module
    reference: nn.Module
    plans: list[LayerLowering]
    out: Path
    scratch: Path

    def export(self, graph: Graph, ref: Graph) -> GraphReport:
        options, final = self.options, self.out / graph.filename
        called = set(trace_graph(graph, self.exported, self.plans, options, self.scratch / graph.filename))
        model = onnx.load(str(self.scratch / graph.filename))
        nodes_exported = optimize.node_count(model)
        optimize.strip_dropout(model)
        optimize.drop_untyped_value_info(model)
        fold_constants(model)
        optimize.pin_output_dims(model, static_sizes(graph))
        optimize.annotate(model, {"mode": options.mode, "dtype": options.dtype,
                                  **({"quantize": options.quantize} if options.quantize else {}),
                                  "layers": [_layer_dict(p) for p in self.plans if p.spec.name in called]})
        optimize.save(model, final)
        onnx.checker.check_model(str(final), full_check=True)
        nodes_optimized, diff, diff_float = self._run(final, ref)
        size = sum(p.stat().st_size for p in self.out.glob(f"{graph.filename}*"))
        moe = sum(1 for n in model.graph.node if n.op_type in ("MoE", "QMoE") and n.domain == "com.microsoft")
        return GraphReport(graph.filename, nodes_exported, optimize.node_count(model), nodes_optimized, moe,
                           round(size / 2**20, 2), diff, diff_float)

    def _run(self, path: Path, ref: Graph) -> tuple[int | None, float | None, float | None]:
        """onnxruntime on the saved graph: node count after its optimisation, the parity check and, with
        quantized experts, the difference from the float model."""
        options = self.options
        if not (options.optimize or options.check):
            return None, None, None
        stem = path.name.removesuffix(".onnx")
        target = (self.out if options.save_optimized else self.scratch) / f"{stem}_optimized.onnx"
        sess = session(path, options.provider, level="all" if options.optimize else "basic",
                       save_to=target if options.optimize else None)
        nodes = optimize.node_count(onnx.load(str(target), load_external_data=False)) if options.optimize else None
        if not options.check:
            return nodes, None, None
        dropless_layers = {p.spec.name for p in self.plans if p.lowering in ("fused", "qmoe")}
        quantized = {p.spec.name: p.quantized for p in self.plans if p.quantized}
        with dequantized(self.reference, quantized):
            diff = max_abs_diff(ref, self.reference, sess, dropless_layers)
        return nodes, diff, max_abs_diff(ref, self.reference, sess, dropless_layers) if quantized else None
