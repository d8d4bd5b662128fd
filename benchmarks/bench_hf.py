"""Time of `moeify export --target hf-switch` on a t5-small conversion, against what its parts cost alone.

Converts the t5-small preset with 8 experts (149M parameters, float32), saves it, then times,
interleaved over several repeats in this one process:
  - moeify.load of the moeify directory (the export's first step),
  - the whole export (load, map to SwitchTransformers, check every tensor on the meta device, write),
  - transformers' own save_pretrained of the exported model (the write alone, the baseline), and
  - transformers' from_pretrained of the export (what a user pays to load it).
The export should cost about load + save_pretrained: the mapping and the meta-device check are cheap.
Usage: python benchmarks/bench_hf.py [--experts 8] [--repeats 3] [--out FILE]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _report import report

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
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
            times["load"].append(timed(lambda: moeify.load(work / "src")))
            out = work / f"hf-{r}"
            times["export"].append(timed(lambda: export_hf("switch", work / "src", out)))
            model = SwitchTransformersForConditionalGeneration.from_pretrained(out)
            times["save_pretrained"].append(timed(lambda: model.save_pretrained(work / f"again-{r}")))
            times["from_pretrained"].append(
                timed(lambda: SwitchTransformersForConditionalGeneration.from_pretrained(out)))
            del model
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
               notes=["The export's overhead over loading the source and writing the checkpoint is the "
                      "mapping to SwitchTransformers names and the check of every tensor against the class "
                      "built on the meta device."])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
