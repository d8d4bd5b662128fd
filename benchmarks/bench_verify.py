"""What moeify-manifest.json costs: save with and without the manifest, load with and without verification.

Builds a T5 (d_model 512, d_ff 2048, 4+4 blocks) converted with 32 experts per Switch layer (about
1.2 GB in float32), then times, interleaved and repeated (median): moeify.save with the manifest
(each weight file hashed right after it is written) and without it; moeify.load plus a read of every
weight page, with verification (each file hashed just before it loads) and with verify=False, once
with the files in the page cache (warm) and once with them evicted first (cold: posix_fadvise
DONTNEED, per file, so that nothing else on the machine is disturbed), which is where a second read
of the disk would show.
Usage: python benchmarks/bench_verify.py [--experts 32] [--reps 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _report import positive_int, report

ROOT = Path(__file__).resolve().parents[1]


def _evict(directory: Path) -> None:
    """Drop `directory`'s files from the page cache (written back first, and unmapped: a loaded model that is still
    alive maps its files, and the kernel keeps mapped pages whatever the advice)."""
    gc.collect()
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _touch(model) -> None:
    """Read one float of every 4 KiB page of every weight: safetensors maps the files, so a load alone reads
    nothing, and the pages come in at the first forward pass. Timing this too counts the read where it happens."""
    for t in model.state_dict().values():
        t.reshape(-1)[::1024].sum()


def _timed(fn) -> float:
    gc.collect()  # the previous model's memory and mappings go before the timer starts, not during
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=positive_int, default=32)
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_verify.md")
    args = parser.parse_args()

    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    import moeify
    from moeify.checkpoint import integrity, store
    from moeify.checkpoint.integrity import sha256_file

    torch.manual_seed(0)
    dense = T5ForConditionalGeneration(T5Config(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=4,
                                                vocab_size=32128, architectures=["T5ForConditionalGeneration"]))
    model = moeify.convert(dense, moeify.MoEConfig(num_experts=args.experts), inplace=True)

    def clear(out: Path) -> None:
        """Remove the previous save and flush the disk, untimed: neither variant pays for the other's writeback."""
        if out.exists():
            shutil.rmtree(out)
        os.sync()

    def save(out: Path, manifest: bool) -> None:
        if manifest:
            moeify.save(model, out)
            return
        # The same save with the two hashing steps switched off: what moeify wrote before manifests.
        remember, write_manifest = store.remember, integrity.write_manifest
        store.remember, integrity.write_manifest = (lambda path: None), (lambda directory: None)
        try:
            moeify.save(model, out)
        finally:
            store.remember, integrity.write_manifest = remember, write_manifest

    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        out = Path(tmp) / "m"
        times: dict[str, list[float]] = {k: [] for k in ("save", "save+manifest", "load warm", "load warm+verify",
                                                         "load cold", "load cold+verify", "sha256 warm")}
        save(out, manifest=True)  # warm-up: first-call allocations and imports are nobody's cost
        for _ in range(args.reps):  # interleaved: drift on a shared machine hits every variant alike
            clear(out)
            times["save"].append(_timed(lambda: save(out, manifest=False)))
            clear(out)
            times["save+manifest"].append(_timed(lambda: save(out, manifest=True)))
            _touch(moeify.load(out))  # warm the cache
            times["load warm"].append(_timed(lambda: _touch(moeify.load(out, verify=False))))
            times["load warm+verify"].append(_timed(lambda: _touch(moeify.load(out, verify=True))))
            _evict(out)
            times["load cold"].append(_timed(lambda: _touch(moeify.load(out, verify=False))))
            _evict(out)
            times["load cold+verify"].append(_timed(lambda: _touch(moeify.load(out, verify=True))))
            times["sha256 warm"].append(_timed(lambda: [sha256_file(p) for p in sorted(out.iterdir())]))
        size = sum(p.stat().st_size for p in out.iterdir())
    median = {k: statistics.median(v) for k, v in times.items()}
    gib = size / 2**30
    rows = []
    for what, base, with_check in (("save", "save", "save+manifest"),
                                   ("load + read every weight, files cached", "load warm", "load warm+verify"),
                                   ("load + read every weight, files evicted", "load cold", "load cold+verify")):
        rows.append((what, f"{median[base]:.2f}", f"{median[with_check]:.2f}",
                     f"{median[with_check] - median[base]:+.2f}", f"{median[with_check] / median[base]:.2f}x"))
    report(f"Manifest cost: T5 d_model 512, d_ff 2048, {args.experts} experts x 4 Switch layers, float32, "
           f"{gib:.2f} GiB on disk, median of {args.reps}",
           ["operation", "without s", "with manifest s", "difference s", "ratio"], rows, args.out,
           notes=[f"sha256 alone over the cached files: {median['sha256 warm']:.2f} s "
                  f"({gib / median['sha256 warm']:.2f} GiB/s, hashlib, one core).",
                  "Variants run interleaved in one process; a shared 2-core machine makes single runs noisy.",
                  "Save: the previous output removed and the disk flushed (os.sync) before the timer starts; the "
                  "time is moeify.save's, whose writes the kernel completes later.",
                  "Load: moeify.load, then one float read from every 4 KiB page of every weight (safetensors maps "
                  "the files: without the read, the disk I/O would happen at the first forward pass instead).",
                  "Evicted: each file was dropped from the page cache (posix_fadvise DONTNEED after fsync) before "
                  "the load; with verification the hash reads the disk and the load reads the pages it left "
                  "cached, so the disk is read once either way."])


if __name__ == "__main__":
    main()
