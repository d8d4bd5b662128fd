"""Conversion and loading speed: wall time and peak RSS of each case in a fresh process, imports included.

Targets (issue 13): t5-large -> 128 experts on meta under 5 s; t5-small -> 8 upcycled experts under 3 s;
moeify.load of that output at most 1.3x the model's size in peak RSS above the interpreter's imports.
Usage: python benchmarks/bench_convert.py [--out FILE]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import report

TARGETS = {"meta": 5.0, "convert": 3.0}  # seconds
LOAD_RSS_RATIO = 1.3
# Each case prints "BENCH seconds peak_rss_bytes baseline_rss_bytes weight_bytes" from inside the child: the
# seconds count from interpreter start (imports included); baseline is RSS after the imports the case needs.
PRELUDE = """import resource, sys, time
START = time.perf_counter()
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def done(baseline, weights): print('BENCH', time.perf_counter() - START, rss(), baseline, weights)
"""
CONVERT = PRELUDE + """from moeify.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    done(0, 0)
"""
LOAD = PRELUDE + """import torch, transformers, moeify
baseline = rss()
model = moeify.load(sys.argv[1])
# Read every weight once: safetensors maps the files, and pages nobody has touched are not resident yet.
unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once
for t in unique.values():
    t.sum()
done(baseline, sum(t.numel() * t.element_size() for t in unique.values()))
"""


def child(code: str, *args: str) -> tuple[float, int, int, int]:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    line = next((line for line in proc.stdout.splitlines() if line.startswith("BENCH")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{args}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    seconds, peak, baseline, weights = line.split()[1:]
    return float(seconds), int(peak), int(baseline), int(weights)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_convert.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        meta, small = Path(tmp) / "large-meta", Path(tmp) / "small"
        s, peak, _, _ = child(CONVERT, "convert", "t5-large", "--experts", "128", "--device", "meta", "-o", str(meta))
        rows.append(("convert t5-large -> 128 experts, --device meta", f"{s:.2f} s", gib(peak), "-",
                     f"< {TARGETS['meta']:.0f} s", "yes" if s < TARGETS["meta"] else "NO"))
        s, peak, _, _ = child(CONVERT, "convert", "t5-small", "--experts", "8", "-o", str(small))
        rows.append(("convert t5-small -> 8 experts, upcycled", f"{s:.2f} s", gib(peak), "-",
                     f"< {TARGETS['convert']:.0f} s", "yes" if s < TARGETS["convert"] else "NO"))
        s, peak, baseline, weights = child(LOAD, str(small))
        ratio = (peak - baseline) / weights
        rows.append((f"moeify.load of it ({gib(weights)} of weights)", f"{s:.2f} s", gib(peak),
                     f"{ratio:.2f}x", f"<= {LOAD_RSS_RATIO}x", "yes" if ratio <= LOAD_RSS_RATIO else "NO"))
    report("Conversion and loading, each in a fresh process (imports included)",
           ["case", "wall", "peak RSS", "RSS above imports / weights", "target", "met"], rows, args.out,
           ["RSS above imports: peak RSS less the RSS after `import torch, transformers, moeify`, over the "
            "model's weight bytes: 1.0x is one copy of the weights."])


if __name__ == "__main__":
    main()
