"""A whole model's training step: the t5-small Switch-8 conversion against dense t5-small and transformers'
SwitchTransformersForConditionalGeneration built from the identical config with the identical weights (and the same
attention implementation).

Targets (issue 13): moeify within 1.3x the dense step, and faster than transformers. One process, the models
interleaved on one span-corruption batch, fused AdamW steps (moeify train's), each Switch model's loss with its
router losses; the verdicts take the median of the per-round ratios (paired), as steps drift on a shared host, with
its 95 % confidence interval. --hybrid adds transformers' model with moeify's layers in it.
On CUDA (--device cuda) each step's clock waits for the GPU's queued work; --dtype bf16 casts every model (moeify's
routers stay float32, transformers' routes in float32 too).
Usage: python benchmarks/bench_model.py [--reps 150] [--batch 8] [--seq-len 128] [--hybrid] [--device cpu|cuda]
       [--dtype fp32|bf16] [--out FILE]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from _report import interval, paired, positive_int, report, round_orders, verdict
from bench_layer import DTYPES, machine, synchronizer
from transformers import SwitchTransformersForConditionalGeneration

from moeify.checkpoint.sources import load_dense
from moeify.config import MoEConfig
from moeify.conversion.pipeline import convert
from moeify.layers.collector import router_losses
from moeify.layers.switch import switch_layers
from moeify.targets.hf.switch import to_hf
from moeify.training.config import DataConfig
from moeify.training.data import prepare_data
from moeify.training.loop import no_cache

TARGET_VS_DENSE = 1.3


def models(preset: str, experts: int, seq_len: int) -> dict[str, torch.nn.Module]:
    dense = load_dense(preset).model
    ours = convert(load_dense(preset).model, MoEConfig(num_experts=experts), inplace=True)
    checkpoint = to_hf(ours, {"seq_len": seq_len})
    hf = SwitchTransformersForConditionalGeneration(checkpoint.config)
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in checkpoint.tensors.items()}, strict=False)
    assert not unexpected and all("lm_head" in k or "embed_tokens" in k for k in missing), (missing, unexpected)
    # The same attention everywhere (transformers' Switch has eager only; T5 loads with sdpa, 4 % slower in this step
    # on CPU): the comparison is of the MoE layers, not of two attention kernels.
    for model in (dense, ours):
        model.set_attn_implementation(hf.config._attn_implementation)
    return {"dense": dense, "moeify": ours, "transformers": hf}


HYBRID = "transformers + moeify layers"


def hybrid(ours: torch.nn.Module, hf: torch.nn.Module) -> torch.nn.Module:
    """A copy of transformers' model with copies of moeify's Switch layers in place of its sparse MLPs: the same
    model around other layers, which separates what the layers cost from what the models around them cost."""
    model = copy.deepcopy(hf)
    for name, layer in switch_layers(ours).items():  # ...layer.1.DenseReluDense (T5) is ...layer.1.mlp there
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        assert type(parent.mlp).__name__ == "SwitchTransformersSparseMLP", name
        parent.mlp = copy.deepcopy(layer)
    return model


PHASES = ("forward", "backward", "optimizer")


def step(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
         sync=lambda: None) -> list[float]:
    """Seconds of one training step's forward, backward and optimizer step; `sync` waits for the device's queued
    work (torch.cuda.synchronize) before each reading of the clock."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    kwargs = no_cache(model)  # as `moeify train` calls a model: no key/value cache for a loss (T5 builds one)
    ours = bool(switch_layers(model))  # found before the clock starts, as moeify train does once
    sync()
    start = time.perf_counter()
    if ours:  # what moeify train optimises: cross-entropy + the routers' losses
        with router_losses(model) as losses:
            loss = model(**batch, **kwargs).loss + losses.total()
    elif name == "transformers":  # its router losses join .loss only when asked for (transformers 5 defaults off)
        out = model(**batch, **kwargs, output_router_logits=True)
        assert out.encoder_aux_loss is not None and out.decoder_z_loss is not None, "transformers left out its losses"
        loss = out.loss
    else:
        loss = model(**batch, **kwargs).loss
    sync()
    forward = time.perf_counter()
    loss.backward()
    sync()
    backward = time.perf_counter()
    optimizer.step()
    sync()
    return [forward - start, backward - forward, time.perf_counter() - backward]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-small")
    parser.add_argument("--experts", type=positive_int, default=8)
    # rounds: enough to resolve ~5 % on a busy host (~17 min)
    parser.add_argument("--reps", type=positive_int, default=150)
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_model.md")
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu, or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the models' dtype (routers: float32)")
    parser.add_argument("--hybrid", action="store_true", help=f"add '{HYBRID}' (its 'vs transformers' compares "
                        "the two layers inside one model)")
    args = parser.parse_args()
    built = models(args.preset, args.experts, args.seq_len)
    if args.hybrid:
        built[HYBRID] = hybrid(built["moeify"], built["transformers"])
    batch = next(prepare_data(built["dense"], DataConfig(seq_len=args.seq_len, batch_size=args.batch)).train)
    built = {name: m.to(args.device, DTYPES[args.dtype]) for name, m in built.items()}
    batch = {key: t.to(args.device) for key, t in batch.items()}
    sync = synchronizer(args.device)
    # The optimizer `moeify train` uses (fused AdamW), the same for every model.
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in built.items()}
    for name, m in built.items():  # warm-up: the optimizers' state, first allocations
        step(name, m, optimizers[name], batch, sync)
    # Steps drift by up to 1.5x over seconds on a shared host, so each round runs the models back to back (in a fresh
    # order, so none always follows another's optimizer step) and the verdicts use that round's ratios.
    names = list(built)
    phases: dict[str, list[list[float]]] = {name: [] for name in names}
    orders = round_orders(names)
    for _ in range(args.reps):
        for name in next(orders):
            phases[name].append(step(name, built[name], optimizers[name], batch, sync))
    times = {name: [sum(p) for p in ps] for name, ps in phases.items()}

    def ratios(name: str, base: str) -> list[float]:
        return paired(times[name], times[base])

    rows = [(name, *(f"{1e3 * statistics.median(p[i] for p in phases[name]):.0f}" for i in range(len(PHASES))),
             f"{1e3 * statistics.median(times[name]):.0f}",
             *(f"{statistics.median(ratios(name, base)):.2f}x" for base in ("dense", "transformers")))
            for name in names]
    mine = {base: ratios("moeify", base) for base in ("dense", "transformers")}
    medians = {base: statistics.median(r) for base, r in mine.items()}
    spread = {base: "{:.2f}-{:.2f}x".format(*interval(r)) for base, r in mine.items()}
    report(f"Training step of {args.preset} (dense) and its Switch-{args.experts} conversion (every other FFN), "
           f"batch {args.batch} x {args.seq_len}, {args.dtype}, {machine(args.device)}, {args.reps} rounds",
           ["model", *(f"{p} ms" for p in PHASES), "step ms", "vs dense", "vs transformers"], rows, args.out,
           ["ms: medians over the rounds; vs: the median over rounds of the two steps' ratio within a round "
            f"(paired); 95 % interval of moeify's: dense {spread['dense']}, transformers {spread['transformers']}.",
            f"moeify / dense {medians['dense']:.2f}x (target <= {TARGET_VS_DENSE}x: "
            f"{verdict(mine['dense'], TARGET_VS_DENSE)}); moeify / transformers {medians['transformers']:.2f}x "
            f"(target < 1x: {verdict(mine['transformers'], 1.0)}).",
            *([f"{HYBRID} / transformers: "
               "{:.2f}x (95 % interval {:.2f}-{:.2f}x): the layers alone, in one model.".format(
                   statistics.median(ratios(HYBRID, "transformers")), *interval(ratios(HYBRID, "transformers")))]
              if HYBRID in built else [])])


if __name__ == "__main__":
    main()
