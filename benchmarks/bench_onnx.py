"""Time a Switch t5-small in PyTorch eager and in onnxruntime (portable and fused graphs).

One process: the model is converted from the t5-small preset (random weights: nothing is
downloaded), exported in both modes, and every configuration runs interleaved on the same inputs:
a full encoder + decoder forward, teacher-forced (no KV cache), sequence length 128 on both sides.
PyTorch and onnxruntime get the same number of threads. Fused graphs are dropless; PyTorch and the
portable graph apply the eval capacity factor. Then greedy generation (the `generate` part): tokens/s
of PyTorch eager generate(), and of the fused graphs in onnxruntime without the KV cache (the whole
prefix each step) and with it (--with-past graphs), EOS disabled so every run makes the same number
of tokens. The `quantize` part (not run by default) exports the fused graphs with float, int8 and
int4 experts (com.microsoft.QMoE) and reports their size on disk, forward tokens/s and logit error
against the float PyTorch model (made dropless, as the graphs are, so only quantization differs).
Usage: python benchmarks/bench_onnx.py [--reps 7] [--parts forward generate quantize]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import positive_int, report, round_orders  # noqa: E402

import moeify  # noqa: E402
from moeify.checkpoint.sources import load_dense  # noqa: E402
from moeify.layers.switch import switch_layers  # noqa: E402
from moeify.targets.onnx import OnnxOptions, export_onnx, session  # noqa: E402
from moeify.targets.onnx.generate import Seq2SeqGenerator  # noqa: E402
from moeify.targets.onnx.verify import dropless  # noqa: E402

SEQUENCE = 128


def build(num_experts: int) -> torch.nn.Module:
    dense = load_dense("t5-small", seed=0).model
    return moeify.convert(dense, moeify.MoEConfig(num_experts=num_experts), inplace=True).eval()


def inputs(batch: int) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, 32000, (batch, SEQUENCE), generator=g)
    return {"input_ids": ids.numpy(), "attention_mask": np.ones((batch, SEQUENCE), np.int64),
            "decoder_input_ids": torch.randint(2, 32000, (batch, SEQUENCE), generator=g).numpy()}


def run_torch(model, x) -> tuple[float, float, np.ndarray]:
    """(encoder seconds, decoder seconds, logits)."""
    ids, mask = torch.from_numpy(x["input_ids"]), torch.from_numpy(x["attention_mask"])
    with torch.no_grad():
        t0 = time.perf_counter()
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        t1 = time.perf_counter()
        logits = model(encoder_outputs=(hidden,), attention_mask=mask, use_cache=False,
                       decoder_input_ids=torch.from_numpy(x["decoder_input_ids"])).logits
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, logits.numpy()


def ort_runner(out: Path, threads: int):
    """run_ort over an export's encoder and decoder, sessions opened once."""
    sessions = [session(out / f, threads=threads, spinning=False) for f in ("encoder_model.onnx", "decoder_model.onnx")]
    return lambda x: run_ort(sessions, x)


def run_ort(sessions, x) -> tuple[float, float, np.ndarray]:
    encoder, decoder = sessions
    t0 = time.perf_counter()
    hidden = encoder.run(None, {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]})[0]
    t1 = time.perf_counter()
    logits = decoder.run(None, {"input_ids": x["decoder_input_ids"], "encoder_hidden_states": hidden,
                                "encoder_attention_mask": x["attention_mask"]})[0]
    return t1 - t0, time.perf_counter() - t1, logits


def gemm_flops_per_second(size: int = 2048, reps: int = 5) -> float:
    """This machine's float32 GEMM rate with the benchmark's threads: the compute roofline."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * size**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def forward_flops(model, x) -> tuple[float, float]:
    """Matmul FLOPs of the encoder and of the decoder forward, as PyTorch runs them."""
    counts = []
    for part in (0, 1):
        with FlopCounterMode(display=False) as counter:
            run_torch(model, x) if part else model.get_encoder()(input_ids=torch.from_numpy(x["input_ids"]),
                                                                 attention_mask=torch.from_numpy(x["attention_mask"]))
        counts.append(counter.get_total_flops())
    return counts[0], counts[1] - counts[0]


def measure(num_experts: int, batches: list[int], reps: int, threads: int, scratch: Path,
            peak: float) -> list[tuple[str, ...]]:
    model = build(num_experts)
    runners = {"pytorch": lambda x: run_torch(model, x)}
    for mode in ("portable", "fused"):
        out = scratch / f"{mode}-{num_experts}"
        export_onnx(model, out, OnnxOptions(mode=mode, optimize=False, check=False))
        runners[mode] = ort_runner(out, threads)
    rows = []
    for batch in batches:
        x = inputs(batch)
        reference = runners["pytorch"](x)[2]
        portable_diff = float(np.abs(runners["portable"](x)[2] - reference).max())  # same semantics: must agree
        assert portable_diff < 1e-3, f"portable graph is off by {portable_diff} at E={num_experts}, batch {batch}"
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for name, fn in runners.items():  # warm-up
            fn(x)
        orders = round_orders(list(runners))
        for _ in range(reps):
            for name in next(orders):  # a fresh order each repetition
                times[name].append(runners[name](x)[:2])
        with torch.no_grad():
            flops = forward_flops(model, x)
        for part, pick in (("encoder", lambda t: t[0]), ("encoder + decoder", lambda t: t[0] + t[1])):
            t, p, f = (statistics.median(pick(v) for v in times[n]) * 1e3 for n in ("pytorch", "portable", "fused"))
            bound = pick(flops) / peak * 1e3
            rows.append((str(num_experts), str(batch), part, f"{t:.1f}", f"{p:.1f}", f"{f:.1f}",
                         f"{t / p:.2f}x", f"{t / f:.2f}x", f"{bound:.1f}", f"{t / bound:.2f}x", f"{f / bound:.2f}x",
                         f"{portable_diff:.1e}"))
    return rows


def measure_generation(num_experts: int, batches: list[int], reps: int, threads: int, scratch: Path,
                       new_tokens: int) -> list[tuple[str, ...]]:
    model = build(num_experts)
    model.generation_config.eos_token_id = None  # random weights: never stop early, same work everywhere
    out = scratch / f"generate-{num_experts}"
    export_onnx(model, out, OnnxOptions(mode="fused", with_past=True, optimize=False, check=False))
    ort = Seq2SeqGenerator(out, threads=threads, spinning=False)

    def eager(x):
        with torch.no_grad():
            return model.generate(input_ids=torch.from_numpy(x["input_ids"]), do_sample=False, num_beams=1,
                                  attention_mask=torch.from_numpy(x["attention_mask"]),
                                  max_new_tokens=new_tokens).numpy()

    runners = {"eager": eager,
               "no cache": lambda x: ort.greedy(x["input_ids"], x["attention_mask"], new_tokens, cache=False),
               "cache": lambda x: ort.greedy(x["input_ids"], x["attention_mask"], new_tokens)}
    rows = []
    for batch in batches:
        x = inputs(batch)
        tokens = {name: fn(x) for name, fn in runners.items()}  # warm-up, and what each generates
        assert all(t.shape == (batch, 1 + new_tokens) for t in tokens.values())
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(reps):
            names = list(runners)
            for name in names[r % 3:] + names[:r % 3]:
                times[name].append(_timed(functools.partial(runners[name], x)))
        rate = {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}
        same = {name: float((tokens[name] == tokens["eager"]).mean()) for name in ("no cache", "cache")}
        rows.append((str(num_experts), str(batch), f"{rate['eager']:.1f}", f"{rate['no cache']:.1f}",
                     f"{rate['cache']:.1f}", f"{rate['no cache'] / rate['eager']:.2f}x",
                     f"{rate['cache'] / rate['eager']:.2f}x", f"{same['no cache']:.0%}", f"{same['cache']:.0%}"))
    return rows


def report_generation(rows, args, threads) -> None:
    import onnxruntime

    title = (f"Switch t5-small, greedy generation of {args.new_tokens} tokens from {SEQUENCE} input tokens, "
             f"median of {args.reps}, {threads} threads; torch {torch.__version__}, onnxruntime "
             f"{onnxruntime.__version__}")
    header = ["experts", "batch", "eager tok/s", "ORT no cache tok/s", "ORT cache tok/s", "no cache / eager",
              "cache / eager", "same tokens (no cache)", "same tokens (cache)"]
    notes = ["tok/s = batch x new tokens / wall time of one whole generation, encoder included (higher is better).",
             "eager = PyTorch generate(do_sample=False, num_beams=1), which uses transformers' KV cache; ORT = the "
             "fused graphs",
             "exported with --with-past, run by moeify.targets.onnx.generate (no cache: decoder_model.onnx over the "
             "whole prefix each step).",
             "same tokens = share of generated tokens equal to eager's: fused layers are dropless, eager applies the "
             "eval capacity factor."]
    report(title, header, rows, args.gen_out, notes)


def measure_quantization(num_experts: int, batches: list[int], reps: int, threads: int,
                         scratch: Path) -> list[tuple[str, ...]]:
    model = build(num_experts)
    runners, sizes = {}, {}
    for scheme in ("float", "int8", "int4"):
        out = scratch / f"quantize-{scheme}-{num_experts}"
        export_onnx(model, out, OnnxOptions(quantize=None if scheme == "float" else scheme, optimize=False,
                                            check=False))
        sizes[scheme] = sum(p.stat().st_size for p in out.glob("*.onnx*")) / 2**20
        runners[scheme] = ort_runner(out, threads)
    rows = []
    for batch in batches:
        x = inputs(batch)
        with dropless(model, set(switch_layers(model))):  # the graphs are dropless: compare like with like
            reference = run_torch(model, x)[2]
        logits = {name: fn(x)[2] for name, fn in runners.items()}  # warm-up, and what each computes
        times: dict[str, list[float]] = {name: [] for name in runners}
        for r in range(reps):
            names = list(runners)
            for name in names[r % 3:] + names[:r % 3]:
                times[name].append(sum(runners[name](x)[:2]))
        for name in runners:
            diff = np.abs(logits[name] - reference)
            agree = float((logits[name].argmax(-1) == reference.argmax(-1)).mean())
            ms = statistics.median(times[name]) * 1e3
            rows.append((str(num_experts), str(batch), name, f"{sizes[name]:.1f}", f"{ms:.1f}",
                         f"{batch * SEQUENCE / ms * 1e3:.0f}", f"{diff.max():.2e}", f"{diff.mean():.2e}",
                         f"{agree:.1%}"))
    return rows


def report_quantization(rows, args, threads) -> None:
    import onnxruntime

    title = (f"Switch t5-small, fused graphs with float / int8 / int4 experts, encoder + decoder forward, sequence "
             f"{SEQUENCE}, median of {args.reps}, {threads} threads; torch {torch.__version__}, onnxruntime "
             f"{onnxruntime.__version__}")
    header = ["experts", "batch", "experts as", "MiB on disk", "ms", "tok/s", "max |Δ| logits", "mean |Δ| logits",
              "top-1 agreement"]
    notes = ["float: com.microsoft.MoE; int8 / int4: com.microsoft.QMoE, symmetric per-output-channel weights; "
             "routers, attention,",
             "embeddings and the LM head stay float32 in every graph. tok/s = batch x 128 decoder positions / "
             "(encoder + decoder) time.",
             "|Δ| and top-1 agreement: the graph's logits against PyTorch's float model made dropless (as the "
             "graphs are), over every",
             "position of the batch (random weights: the logits are those of an untrained model)."]
    report(title, header, rows, args.quant_out, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=positive_int, default=7)
    parser.add_argument("--experts", type=positive_int, nargs="+", default=[8, 32])
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="for PyTorch and onnxruntime alike [default: torch's]; 1 where other work shares the "
                             "cores (PyTorch's threads wait on each other when one is descheduled)")
    parser.add_argument("--parts", nargs="+", choices=["forward", "generate", "quantize"],
                        default=["forward", "generate"])
    parser.add_argument("--new-tokens", type=positive_int, default=32, help="generate: tokens per sequence")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_onnx.md")
    parser.add_argument("--gen-out", type=Path, default=Path(__file__).parent / "results" / "bench_onnx_generate.md")
    parser.add_argument("--quant-out", type=Path,
                        default=Path(__file__).parent / "results" / "bench_onnx_quantize.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if "generate" in args.parts:
        rows = []
        with tempfile.TemporaryDirectory() as scratch:
            for e in args.experts:
                rows += measure_generation(e, args.batch, args.reps, threads, Path(scratch), args.new_tokens)
        report_generation(rows, args, threads)
    if "quantize" in args.parts:
        rows = []
        with tempfile.TemporaryDirectory() as scratch:
            for e in args.experts:
                rows += measure_quantization(e, args.batch, args.reps, threads, Path(scratch))
        report_quantization(rows, args, threads)
    if "forward" not in args.parts:
        return
    rows = []
    peak = gemm_flops_per_second()
    with tempfile.TemporaryDirectory() as scratch:
        for e in args.experts:
            rows += measure(e, args.batch, args.reps, threads, Path(scratch), peak)
    import onnxruntime

    title = (f"Switch t5-small, encoder + decoder forward, sequence {SEQUENCE}, median of {args.reps}, "
             f"{threads} threads; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    header = ["experts", "batch", "graph", "PyTorch ms", "ORT portable ms", "ORT fused ms",
              "portable speed-up", "fused speed-up", "roofline ms", "PyTorch / roofline", "fused / roofline",
              "portable max |Δ|"]
    notes = ["Speed-up = PyTorch eager time / onnxruntime time (higher is better). The decoder is teacher-forced over",
             "all 128 positions and includes the LM head (128 x 512 x 32128), a dense GEMM both runtimes share.",
             "Fused graphs are dropless (com.microsoft.MoE); PyTorch and the portable graph use eval capacity "
             "factor 2.0;",
             "portable max |Δ| compares the portable graph's logits with PyTorch's.",
             f"roofline = the forward's matmul FLOPs (torch's FlopCounterMode) at this machine's float32 GEMM rate "
             f"({peak / 1e9:.0f} GFLOP/s, {threads} threads, measured in this run): no runtime can beat it."]
    report(title, header, rows, args.out, notes)


if __name__ == "__main__":
    main()
