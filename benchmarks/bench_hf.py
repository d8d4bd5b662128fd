"""Time of `moeify export --target hf-switch` on a t5-small conversion, against what its parts cost alone.

Converts the t5-small preset with 8 experts (149M parameters, float32), saves it, then times,
interleaved over several repeats in this one process:
  - moeify.load of the moeify directory (the export's first step),
  - the whole export (load, map to SwitchTransformers, check every tensor on the meta device, write),
  - transformers' own save_pretrained of the exported model (the write alone, the baseline), and
  - transformers' from_pretrained of the export (what a user pays to load it).
The export should cost about load + save_pretrained: the mapping and the meta-device check are cheap.
Usage: python benchmarks/bench_hf.py [--experts 8] [--repeats 5] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

from _report import positive_int, report

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    os.sync()  # earlier writes flushed first: their writeback must not land inside this measurement
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_hf.md")
    args = parser.parse_args()

    import torch
    from transformers import SwitchTransformersForConditionalGeneration
    from transformers.utils import logging as hf_logging

    import moeify
    from moeify.checkpoint.sources import load_dense
    from moeify.targets.hf.export import export_hf

    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="bench-hf-"))
    try:
        dense = load_dense("t5-small")
        sparse = moeify.convert(dense.model, moeify.MoEConfig(num_experts=args.experts), inplace=True,
                                source=dense.source)
        params = sum(p.numel() for p in sparse.parameters())
        moeify.save(sparse, work / "src")
        del sparse
        times: dict[str, list[float]] = {"load": [], "export": [], "save_pretrained": [], "from_pretrained": []}
        for r in range(args.repeats):  # interleaved, so drift on shared cores hits every row alike
            out = work / f"hf-{r}"
            times["load"].append(timed(partial(moeify.load, work / "src")))
            times["export"].append(timed(partial(export_hf, "switch", work / "src", out)))
            exported = SwitchTransformersForConditionalGeneration.from_pretrained(out)
            times["save_pretrained"].append(timed(partial(exported.save_pretrained, work / f"again-{r}")))
            load_hf = partial(SwitchTransformersForConditionalGeneration.from_pretrained, out)
            times["from_pretrained"].append(timed(load_hf))
            del exported
        med = {k: statistics.median(v) for k, v in times.items()}
        size = sum(p.stat().st_size for p in (work / "hf-0").iterdir()) / 2**20
        base = med["load"] + med["save_pretrained"]
        rows = [
            ("moeify.load (moeify directory)", f"{med['load']:.2f}", "-"),
            ("transformers save_pretrained (write only)", f"{med['save_pretrained']:.2f}", "-"),
            ("export --target hf-switch (load + map + check + write)", f"{med['export']:.2f}",
             f"{med['export'] / base:.2f}x"),
            ("transformers from_pretrained of the export", f"{med['from_pretrained']:.2f}", "-"),
        ]
        report(f"hf-switch export of t5-small with {args.experts} experts ({params / 1e6:.0f}M parameters, "
               f"{size:.0f} MiB), median of {args.repeats}, 2 threads",
               ["step", "seconds", "export / (load + save_pretrained)"], rows, args.out,
               notes=["Beyond loading the source and writing the checkpoint, the export maps names, "
                      "checks every tensor against the class built on the meta device, and copies each "
                      "expert out of its stacked tensor (safetensors needs separate storage); disk writes "
                      "on a shared machine make single runs vary by a second or more."])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
