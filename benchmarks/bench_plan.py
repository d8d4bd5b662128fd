"""Time `moeify plan` end to end and record its peak memory, each case in a fresh process.

Targets: Switch-C (2048 experts, 15+15 layers) on 32 x dgx-h100 plans in under 10 s and 2 GB RSS.
Usage: python benchmarks/bench_plan.py [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import report

# Switch-C as the paper trained it: Adafactor, 2^20 tokens per batch (2048 x 512), here over 256
# GPUs = 4096 tokens each. With Adam's 16 bytes per parameter it needs 64 nodes, which the
# planner says.
CASES = [
    ("switch-base-128", "dgx-a100", 2, []),
    ("switch-c-2048", "dgx-h100", 32, ["--optimizer", "adafactor", "--tokens-per-rank", "4096"]),
]
TARGET_S, TARGET_RSS = 10.0, 2 << 30


def run_case(model: str, topology: str, nodes: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        code = ("import resource, sys, time; t0 = time.perf_counter(); from moeify.cli import main\n"
                "try:\n    main(standalone_mode=False)\nfinally:\n"
                "    print('BENCH', time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        args = ["plan", model, "--topology", topology, "--nodes", str(nodes), "-o", str(out), *extra]
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
        seconds, rss_kb = next(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("BENCH"))
        plan = json.loads(out.read_text())
    return {"model": model, "flags": " ".join(extra) or "defaults", "topology": f"{nodes} x {topology}", "gpus": plan["world_size"],
            "seconds": float(seconds), "rss": int(rss_kb) * 1024, "mesh": plan["mesh"]["shape"],
            "step_ms": plan["estimate"]["step_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_plan.md")
    args = parser.parse_args()
    rows = []
    for case in CASES:
        r = run_case(*case)
        rows.append((r["model"], r["flags"], r["topology"], str(r["gpus"]), f"{r['seconds']:.1f}", f"{r['rss'] / 2**20:.0f} MiB",
                     f"{r['seconds'] / TARGET_S:.2f}x", f"{r['rss'] / TARGET_RSS:.2f}x",
                     " x ".join(map(str, r["mesh"]))))
    report(f"moeify plan, whole command in a fresh process (target: < {TARGET_S:.0f} s, < {TARGET_RSS >> 30} GB RSS)",
           ["model", "flags", "topology", "GPUs", "seconds", "peak RSS", "vs time target", "vs RSS target", "dp x ep"],
           rows, args.out)


if __name__ == "__main__":
    main()
