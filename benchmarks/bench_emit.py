"""Peak memory of `export --target torch-distributed`: streaming keeps it near one shard, not the model.

Builds a T5 (d_model 512, d_ff 2048, 4+4 blocks) converted with 32 experts per Switch layer
(about 1.2 GB in float32), saves it, then exports it for 8 and 16 ranks (the model is at least
4x the largest shard), each in a fresh process that reports its peak RSS (VmHWM). For contrast
it also measures a plain `moeify.load` of the whole model.
Usage: python benchmarks/bench_emit.py [--experts 32] [--worlds 8,16] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import positive_int, report

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints JSON. The baseline is RSS after imports."""
    import torch

    import moeify
    from moeify.targets.distributed.export import export_distributed

    torch.set_num_threads(1)
    baseline = _rss()
    t0 = time.perf_counter()
    if args.child == "make":
        from transformers import T5Config, T5ForConditionalGeneration

        torch.manual_seed(0)
        dense = T5ForConditionalGeneration(T5Config(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=4,
                                                    vocab_size=32128, architectures=["T5ForConditionalGeneration"]))
        moeify.save(moeify.convert(dense, moeify.MoEConfig(num_experts=args.experts), inplace=True), args.source)
    elif args.child == "load":
        moeify.load(args.source)
    else:
        export_distributed(args.source, args.output, world_size=args.world)
    print(json.dumps({"baseline": baseline, "peak": _peak_rss(), "seconds": time.perf_counter() - t0}))


def _measure(*child_args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *child_args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=positive_int, default=32)
    parser.add_argument("--worlds", default="8,16")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_emit.md")
    parser.add_argument("--child", choices=["make", "load", "export"], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=positive_int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    mib = 1 << 20
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        source = Path(tmp) / "src"
        _measure("--child", "make", "--source", str(source), "--experts", str(args.experts))
        full = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        load = _measure("--child", "load", "--source", str(source))
        rows = [("moeify.load (whole model)", "1", f"{full / mib:.0f}", "-", "-", f"{load['peak'] / mib:.0f}",
                 f"{(load['peak'] - load['baseline']) / mib:.0f}", "-", "-", f"{load['seconds']:.1f}")]
        for world in map(int, args.worlds.split(",")):
            out = Path(tmp) / f"dist{world}"
            m = _measure("--child", "export", "--source", str(source), "--output", str(out), "--world", str(world))
            largest = max(f.stat().st_size for f in out.glob("rank-*.safetensors"))
            rows.append(("export torch-distributed", str(world), f"{full / mib:.0f}", f"{largest / mib:.0f}",
                         f"{full / largest:.1f}", f"{m['peak'] / mib:.0f}", f"{(m['peak'] - m['baseline']) / mib:.0f}",
                         f"{m['peak'] / largest:.2f}", f"{(m['peak'] - m['baseline']) / largest:.2f}",
                         f"{m['seconds']:.1f}"))
    report(f"Emission peak memory: T5 d_model 512, d_ff 2048, {args.experts} experts x 4 Switch layers, float32",
           ["what", "ranks", "model MiB", "largest shard MiB", "model / shard", "peak RSS MiB",
            "peak - baseline MiB", "peak / shard", "(peak - baseline) / shard", "seconds"],
           rows, args.out,
           notes=["Each row runs in a fresh process; peak RSS is VmHWM, baseline is RSS after importing torch, "
                  "transformers and moeify.",
                  "A shard holds the dense weights (every rank needs them) plus that rank's experts. Emission "
                  "reads one shard's tensors (expert stacks sliced with safetensors get_slice), writes it and "
                  "frees it before the next, so the peak follows the largest shard, not the model.",
                  "Above one shard, the peak holds transient read and write buffers: safetensors maps the "
                  "source file while a tensor is read (each file is closed after its read, so mapped pages "
                  "never pile up across tensors or shards)."])


if __name__ == "__main__":
    main()
