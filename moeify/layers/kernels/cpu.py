"""The CPU kernel: experts batched into few bmm calls by a cost model, oneDNN's linear for float32 groups, native
loops for experts with few rows (native.py), reduced precision computed in float32 where torch has no fast path for
it, and buffers from moeify.layers.memory. Tuned on 2-core AVX-512 and AVX2 machines (docs/performance.md)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from moeify.layers import memory
from moeify.layers.kernels import Counts, host_counts, mkl, native, one_expert_linear, records_grad, router_logits
from moeify.layers.memory import gradient_buffer, zero_pages_

# Cost model for choosing how to batch experts into bmm calls, in units of "one padded row".
# Reading an expert's weight costs as much as ~10 rows of GEMM (2 * 150 GFLOP/s / 30 GB/s for
# float32), and each bmm call ~0.1 ms of overhead. Measured on a 2-core AVX-512 machine.
WEIGHT_READ_ROWS = 10.0
CALL_SECONDS = 1e-4
_FLOPS = 150e9

# From this many float32 rows per expert (forward, backward) the GEMMs run one oneDNN linear per expert instead of a
# bmm over a batch of experts: MKL packs the transposed weight on every call, oneDNN streams it (1.1-1.5x faster from
# 3 rows, 64 experts), and MKL's GEMMs reach half of oneDNN's rate here (the backward's, as transposed views, 2x).
# The forward takes oneDNN from one row: below 4 rows MKL's x @ w.T on AVX2 sums in an order that depends on where
# the weight (1 row) or the input (2-3 rows) lies in memory, so a checkpoint loaded at other offsets would compute
# other bits; oneDNN's does not, at 0.9-1.5x bmm's time for forward GEMMs of 1-2 rows over 64 experts and 0.97-1.05x
# for the layer's training step. Where the native loops build (AVX-512, AVX2) they take those rows. bfloat16 has
# none: its mm is oneDNN's already, and writes straight into the output where the private op's result must be
# copied there. On AVX2 the weight gradient never takes it: oneDNN's linear(g.T, x.T) ran 1.1-2.1x the time of MKL's
# mm(g.T, x) written in place, at 40-8192 rows, both FFN shapes. Its forward and input gradient stop at 512 rows
# there: the layer's step with them on MKL from one row took 1.1-1.4x as long at 64-128 rows per expert, as long at
# 256, and 0.90-0.96x at ~1,000 (oneDNN's result is copied into place, MKL's bmm writes there). docs/performance.md.
# {instruction set: {dtype: ((from, below) rows of the forward, of the input gradient, of the weight gradient)}};
# None: never; below None: no bound.
# On the AMX machine (AVX-512 cores with AMX tiles, 2026-12-04) MKL's float32 GEMMs overtook oneDNN's from 64 rows:
# the layer's training step with oneDNN only below 64 rows took 0.81x the time at E 8 with 1,024 and 8,192 tokens,
# 0.91x at E 64 / 8,192, the same at E 32 / 1,024 (docs/performance.md). Its input gradient (g @ w, the weight as it
# lies) from 16 rows: MKL's per expert took 0.80-0.97x oneDNN's time at 16-64 rows (64 experts, eleventh session).
DNNL_ROWS = {"avx512": {torch.float32: ((1, None), (3, None), (3, None))},
             "amx": {torch.float32: ((1, 64), (3, 16), (3, 64))},
             "avx2": {torch.float32: ((1, 512), (3, 512), None)}}

# Below these rows per expert, the float32 GEMMs that would run on MKL one expert per call (above the native loops'
# rows and oneDNN's) run as one call of MKL's batched GEMM (mkl.py), which hands MKL's threads whole experts: the
# forward, and the input gradient where out > in. Measured on the AMX machine (twelfth session, docs/performance.md):
# over 64 experts of 64-384 rows the forward took 0.85-0.98x the time of one mm per expert, that input gradient
# 0.84-0.98x; in the layer's step at 8,192 tokens 4-15 ms less per linear at E 32-128 (34-288 rows), but more from
# ~256 rows for that input gradient (+3 %) and at ~1,000 for the forward (+4-16 %). Where out <= in the input
# gradient took 1.08x as long in the layer (E 64 / 8,192) though 0.89-0.98x alone; the weight gradient was even.
MKL_BATCH_ROWS = {"amx": {torch.float32: (512, 192)}}
# ... and only with this many experts in the call: 8 experts of ~128 rows took 1.06x as long batched (MKL's threads
# then take whole experts of unequal sizes), 16 of them 0.96x, 32 of ~128 0.95x.
MKL_BATCH_MIN_EXPERTS = 16


# How the weight gradient's experts without rows are zeroed (benchmarks/bench_zeroing.py on the AMX host: float32
# training steps of t5-small's FFN at 64 tokens, a new batch each step). The native loops' streamed stores (49 GB/s
# alone) took 44.0 / 63.1 / 89.3 ms a step at E 64 / 128 / 256; writing zeros with zero_ (16 GB/s) 1.19x / 1.47x /
# 1.83x that; handing their pages back to the kernel (memory.zero_pages_: nothing at once, but the kernel zeroes each
# page again when it is next written, when that expert gets tokens a few steps later) 1.45x / 1.52x / 1.34x. So the
# streamed stores wherever the native loops load. Without them, writing zeros from this fraction of experts with rows
# and handing pages back below it (thirteenth session, E 64 with about 63 % of experts with rows: 49 ms writing
# against 61-83 handing back; E 256 with about 22 %: 155 against 133-142).
ZERO_BY_WRITING_MIN_COVERED = 0.3


@functools.cache
def instruction_set() -> str:
    """The key of the tables tuned per machine class: "avx2" where torch's widest CPU path is AVX2, "amx" where it is
    AVX-512 and torch reports AMX tiles, else "avx512" (where most of them were measured). Asked once: a layer's
    decisions ask it several times a step."""
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        return "avx2"
    return "amx" if native.torch_reports_amx() else "avx512"


# From this many bfloat16 rows per expert the forward runs one mm per expert instead of a bmm over a batch of experts
# (AVX-512: 1.1-1.7x faster at E <= 64; bmm is as fast up to ~64 rows). None: never. On the AMX machine oneDNN's bmm
# hands its two threads whole experts, and ran every GEMM of the FFN faster than one mm per expert at 64-1,024 rows
# (8 and 32 experts; 1.9-2.0x where out <= in, at 512-1,024 rows; docs/performance.md).
MM_MIN_ROWS = {"avx512": 64, "avx2": 64, "amx": None}
# There, where the busiest expert has more rows than the native forward takes, the experts run as one bmm over their
# span padded to the busiest (CpuLayout._span_pays) while that pads their rows by at most this factor: bfloat16 at 8,192
# tokens, forward 0.84x the pairs' time at E 8 (1.13x the rows) and 0.91x at E 32 (1.25x), training 0.92x and 1.00x;
# at 1,024 tokens and from E 64, where the native loops take every expert, the span took 1.03-1.12x (fifteenth session).
SPAN_MAX_PADDING = 1.3
# Up to this many rows per expert the hand-written kernels of native.py run the op, where torch's paths pack the
# weight, write its gradient at a third of the memory's rate, or copy oneDNN's result into place (float32 from 3
# rows): per build of the kernels and (activations' dtype, weights' dtype), (where out > in, where out <= in) for the
# forward, the input gradient and the weight gradient, measured per op, dtypes and FFN shape over 64 experts against
# the path the kernel takes without them (benchmarks/bench_skinny.py, docs/performance.md). bfloat16's bmm streams
# its weights better than float32's, and the native forward's dot products are short where out > in (in = d_model).
# A pair without an entry never runs natively (float32 compute on bfloat16 weights is measured only where it runs
# by default: AVX2, where torch has no fast bfloat16 GEMM).
F32, BF16 = torch.float32, torch.bfloat16
# The AMX build's bfloat16 ops run on tiles from a few rows (the input gradient from 5, its weight interleaved in cache;
# from 32 rows in blocks of 2 x 2 tiles); torch's bfloat16 GEMMs there are oneDNN's on the same tiles. Against them the
# native input gradient takes 0.74-0.80x the time at 8-16 rows where out > in and loses from 24 (1.14-1.32x); where out
# <= in it is about even at 8-24 rows (1.01-1.06x) and ahead at 32-192 (0.92-0.96x at 32-128; bench_skinny, 2026-12-05,
# tenth session), and in a layer's step at 16 rows 0.93-0.94x (E 64 / 1,024). Its bfloat16 weight gradient where out
# <= in stops at 256 rows since torch's bmm reads g.T laid out (_backward): over 64 equal experts the native one took
# 1.20-1.50x that bmm's time from 96 rows (bench_skinny), but in the layer below 256 rows the experts go in pairs apart,
# and a limit of 64 there cost E 8 / 1,024 and E 64-128 / 8,192 training 1.02-1.04x; from 256 the E 32 / 8,192 step,
# one span of 320 rows, took 0.93x (fifteenth session). Its float32 code is the AVX-512 build's,
# with limits measured on the AMX machine's cores: the weight gradient wins to 128 / 128 rows on operands laid out for
# it (0.60-0.93x torch's path at 64-128 rows, 1.01-1.04x at 192; eleventh session), the input gradient to 32 / 128
# since it reads the weight in runs and from 56 rows copies strips of it out first (0.45-0.94x torch's path at 4-32
# rows; where out > in 1.22x at 48, torch's path there being MKL's batched GEMM from 16 rows, DNNL_ROWS and
# MKL_BATCH_ROWS; where out <= in 0.82-0.91x at 64-128 against MKL's bmm over 64 equal experts, 1.02x at 192; the
# layer's second linear's backward at E 128 / 8,192 0.94x, twelfth session), the forward to 256 / 96 since it runs as
# outer products from 16 rows (0.59-0.65x torch's path at 16-24 rows, 0.74-0.90x at 64-128 and 0.96-0.97x at 192-256
# where out > in; 0.74-0.83x at 16-64 and 0.94-0.96x at 80-96 where out <= in, 1.03x at 128; eleventh session). The
# plain AVX-512 build's forwards were measured again on an AMD EPYC with AVX-512 and the bfloat16 dot product but no
# tiles (bench_skinny, 2026-12-05, nineteenth session): float32 on the outer products 0.57-0.85x torch's path to 128
# rows where out > in (0.89-0.95x at 128-320 in the twenty-first session), 0.62-0.93x to 96 where out <= in (0.97x at
# 128); the float32 weight gradient there 0.69-0.81x where out > in and 0.85-0.92x where out <= in at 96-320 rows
# (twenty-first session: raising the forward's limit where out > in and the weight gradient's from 128 / 64 to 320 /
# 320 took E 64 / 8,192 training 0.98x (forward) and 0.95x (weight gradient) the time, E 32 / 8,192 training 0.95x,
# E 8 / 1,024 0.97x, E 128 / 8,192 0.99x); bfloat16 in units of 1 MB of weight, with the weight prefetched into L2
# (twentieth session), 0.56-0.96x to 96 where out <= in (1.14x at 128), and where out > in as outer products on the
# pair dot product from 25 rows (twenty-first session) 0.59-0.86x to 160 rows (0.93x at 192; 1.00x at 256 in another
# run; the dot products had stopped at 64, 1.14x at 96); the bfloat16 weight gradient on the pair dot product
# 0.37-0.80x to 16 rows where out > in (1.00x at 24) and 0.54-0.88x to 32 where out <= in (1.00x at 48); in the
# twenty-second session's run 0.83-0.96x at 32-192 rows where out > in and 0.94-1.02x at 48-160 where out <= in, and
# in the layer limits of 160 / 96 against 16 / 32 took bfloat16 training E 128 / 8,192 0.95-0.96x the time, E 256 /
# 8,192 0.96x, E 32 / 1,024 0.93x, elsewhere (E 8-64, 1,024-8,192 tokens) 0.99-1.01x; the bfloat16
# input gradient on the pair dot product (twentieth session) 0.34-0.94x to 32 rows where out > in (1.05x at 48) and
# 0.52-0.90x to 24 where out <= in (1.04x at 32); with blocks of 128 weight rows from 12 rows (skinny.cpp's
# PAIR_RUN_ROWS, twenty-second session) 0.45-0.93x to 96 rows where out > in (0.98x at 128, 1.01x at 160) and
# 0.48-0.96x to 96 where out <= in (1.02x at 128): in the layer, limits of 96 / 96 against 32 / 24 took E 256 / 8,192
# training 0.90x the time, E 128 / 8,192 0.93x, E 32 / 1,024 0.90x; E 64 / 8,192 (about 128 rows per expert) and
# E 8 / 1,024 0.98-1.01x, with 128 / 96 or 160 / 128 too. The float32 input gradient's limits held there (measured
# on the first AVX-512 machine, with the column strips that the runs replaced).
NATIVE_MAX_ROWS = {
    "avx512": {(F32, F32): ((320, 96), (48, 128), (320, 320)), (BF16, BF16): ((160, 96), (96, 96), (160, 96))},
    "avx2": {(F32, F32): ((32, 24), (16, 32), (32, 32)), (F32, BF16): ((16, 24), (8, 8), (16, 8))},
    "amx": {(F32, F32): ((256, 96), (32, 128), (128, 128)), (BF16, BF16): ((256, 192), (16, 192), (256, 256))},
}


# Where one batch of at least this many reduced-precision experts runs (a span, CpuLayout._span_pays), the forward
# where out > in runs natively up to these rows per expert, padding included, rather than NATIVE_MAX_ROWS': against
# oneDNN's bmm over 32 experts of equal rows the tiles took 0.72-0.73x its time at 192-352 rows (its bmm steps up at
# 384: 1.25x). In the layer (t5's FFN, bfloat16, interleaved rounds, the span's plan either way): forward 0.88-0.91x
# at E 32 / 8,192 and 9,216, E 48 / 12,288 and E 64 / 16,384, training 0.93-1.00x; at E 16 / 4,096 0.98x and 0.99x,
# at E 8 / 2,048 1.04x and 1.03x, where the limit stays (sixteenth session). None: no such rule.
SPAN_FORWARD_ROWS = {"avx512": None, "avx2": None, "amx": (32, 352)}


def native_max_rows(skinny: native.Skinny | None, compute: torch.dtype, dtype: torch.dtype, out: int,
                    in_: int) -> tuple[int, int, int]:
    """Rows per expert up to which `skinny`'s kernels run the forward, the input gradient and the weight gradient of
    activations in `compute` on weights in `dtype`; zeros without kernels."""
    limits = NATIVE_MAX_ROWS[skinny.variant].get((compute, dtype)) if skinny else None
    return (0, 0, 0) if limits is None else tuple(limit[out <= in_] for limit in limits)


def _forward_rows(skinny: native.Skinny | None, compute: torch.dtype, weight: torch.Tensor,
                  batches: list[_Batch]) -> int:
    """Rows per expert up to which the native loops run this forward: native_max_rows', or SPAN_FORWARD_ROWS' for one
    batch of many reduced-precision experts where out > in."""
    limit = native_max_rows(skinny, compute, weight.dtype, *weight.shape[1:])[0]
    span = SPAN_FORWARD_ROWS[skinny.variant] if limit and compute != torch.float32 else None
    if span and len(batches) == 1 and batches[0].k >= span[0] and weight.shape[1] > weight.shape[2]:
        return max(limit, span[1])
    return limit


# Below this many rows per expert a float32-compute forward (below) that the native loops do not take (they run it
# where they build, at 0.5-0.7x this path's time) runs each expert's GEMM in the weights' own dtype: widening a
# weight costs more than a GEMM of 1-3 rows (64 experts, bfloat16 on AVX2: 0.5-0.7x the widened path's time at 1 row,
# 0.65-0.75x at 2, equal at 4, 1.5-2.9x slower from 8). Its backward widens at every size: torch's bfloat16
# g @ w ran 8-130x slower than the widened GEMM from one row. docs/performance.md.
UPCAST_MIN_ROWS = 4

# torch's reduced-precision GEMMs on CPU run on oneDNN where it supports the dtype on this machine (bfloat16: AVX-512
# or AVX-NE-CONVERT). Elsewhere they take a generic loop: on a 2-core AVX2 machine bfloat16 ran at 18-22 GFLOP/s,
# float32 at 75-98. There the kernel computes in float32 on widened operands: float32 holds every bfloat16 and float16
# value, so each product is exact and sums accumulate in float32, as torch's own reduced-precision GEMMs do; outputs
# and gradients are rounded back once. docs/performance.md.
_NATIVE_REDUCED = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}


@functools.cache
def reduced_is_native(dtype: torch.dtype) -> bool:
    """Whether torch's GEMMs have a fast path for reduced-precision `dtype` here: oneDNN's own check, a private op,
    so where it is missing or fails the answer is yes (torch's path is kept, as without this probe)."""
    try:
        return bool(getattr(torch.ops.mkldnn, _NATIVE_REDUCED[dtype])())
    except (AttributeError, RuntimeError):
        return True


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in dtype: itself when it is already (weights stay in their dtype; upcast kernels widen them per batch)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def probe_dnnl():
    """torch's oneDNN linear op if present and correct here, else None (then bmm does it all): a private op,
    so any way it is missing or wrong falls back silently."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        x, w, b = torch.arange(15.).view(3, 5), torch.arange(20.).view(4, 5).cos(), torch.ones(4)  # no RNG use
        if torch.allclose(op(x, w, b, "none", [], ""), torch.addmm(b, x, w.t()), atol=1e-5):
            return op
    except (AttributeError, RuntimeError):
        pass
    return None


_DNNL: list = []  # [op or None], probed on first use: import stays cheap


def dnnl_op():
    if not _DNNL:
        _DNNL.append(probe_dnnl())
    return _DNNL[0]


class _Batch(NamedTuple):
    """Experts first, first + step, ... (k of them), `slots` padded rows each, as one bmm."""
    first: int
    step: int
    k: int
    slots: int
    row: int  # first padded row of the batch


def _dnnl_at(dnnl: tuple | None, gemm: int, rows: int):
    """oneDNN's linear op when GEMM `gemm` (FORWARD, INPUT_GRAD, WEIGHT_GRAD) of experts with `rows` rows takes it,
    else None; dnnl is CpuKernel.dnnl_for()'s (op, rows range of each GEMM)."""
    bounds = None if dnnl is None else dnnl[1 + gemm]
    if bounds is None or rows < bounds[0] or bounds[1] is not None and rows >= bounds[1]:
        return None
    return dnnl[0]


def _one_expert(batches: list[_Batch]) -> _Batch | None:
    """The batch when one expert takes every row (E = 1, or all tokens routed alike), else None."""
    return batches[0] if len(batches) == 1 and batches[0].k == 1 else None


def _experts_view(t: torch.Tensor, b: _Batch) -> torch.Tensor:
    """t[b.first :: b.step][: b.k] as a strided view: (k, *t.shape[1:])."""
    return t.as_strided((b.k, *t.shape[1:]), (b.step * t.stride(0), *t.stride()[1:]),
                        t.storage_offset() + b.first * t.stride(0))


def _experts_of(batches: list[_Batch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(experts, first padded rows, rows) of every expert in the batches, in padded order. In numpy: torch ops or a
    Python loop over the experts cost 0.1-0.4 ms of a step at E 64-256 with few tokens."""
    if not batches:
        return (np.zeros(0, dtype=np.int64),) * 3
    first, step, k, slots, row = np.array(batches, dtype=np.int64).T
    j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)  # each expert's place in its batch
    return np.repeat(first, k) + np.repeat(step, k) * j, np.repeat(row, k) + np.repeat(slots, k) * j, \
        np.repeat(slots, k)


def _native_rows(batches: list[_Batch], limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(experts, first padded rows, rows) of the batches' experts with up to `limit` rows, or None if none."""
    if not any(b.slots <= limit for b in batches):
        return None
    experts, starts, rows = _experts_of(batches)
    chosen = rows <= limit
    return experts[chosen], starts[chosen], rows[chosen]


def _native(kernel: native.Skinny, op: int, picked, weight: torch.Tensor, *operands: tuple[torch.Tensor, bool]) -> None:
    """Runs a native op over the picked experts. Each operand is (tensor, per_row): rows of the padded layout
    (R, d), or a stacked (E, out, in) weight or its gradient; all contiguous. The first is an activation (x or the
    output's gradient): its dtype is the computation's."""
    experts, starts, rows = picked
    addresses = [t.data_ptr() + (starts * t.shape[-1] if per_row else experts * t[0].numel()) * t.element_size()
                 for t, per_row in operands]
    kernel.run(op, weight.dtype, rows, *addresses, weight.shape[1], weight.shape[2], operands[0][0].dtype)


def _plan(counts: list[int], weight_numel: int, batching: str = "auto") -> list[_Batch]:
    """Batches covering every expert with rows: "auto" chooses by the cost model between "span", one bmm over the
    span of used experts padded to the largest count (best when counts are even), and "pairs" of used experts with
    similar counts (skips unused experts' weights, pads little, still spreads over two cores); "each" is every used
    expert alone, unpadded, in expert order (the layout is then the identity: no rows copied to pad or unpad).
    """
    c = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(c)
    if not len(used):
        return []
    if batching == "each":
        starts = np.cumsum(c) - c
        return [_Batch(e, 1, 1, n, row) for e, n, row in zip(used.tolist(), c[used].tolist(), starts[used].tolist())]
    call_rows = CALL_SECONDS * _FLOPS / (2 * weight_numel)
    lo, span, top = int(used[0]), int(used[-1]) + 1 - int(used[0]), int(c.max())
    one_cost = WEIGHT_READ_ROWS * span + span * top + call_rows
    ranked = used[np.argsort(-c[used], kind="stable")]  # busiest first; ties by expert
    first, second = ranked[0::2], ranked[1::2]  # pairs of neighbours in that ranking; the last may be alone
    sizes = np.full(len(first), 2)
    sizes[len(second):] = 1
    slots = c[first]  # each pair's larger count
    pair_cost = WEIGHT_READ_ROWS * len(used) + int((sizes * slots).sum()) + call_rows * len(first)
    if batching == "span" or batching == "auto" and one_cost <= pair_cost:
        return [_Batch(lo, 1, span, top, 0)]
    paired = len(second)
    low, high = first.copy(), first.copy()
    low[:paired], high[:paired] = np.minimum(first[:paired], second), np.maximum(first[:paired], second)
    rows = np.cumsum(sizes * slots) - sizes * slots
    return [_Batch(*b) for b in zip(low.tolist(), np.maximum(1, high - low).tolist(), sizes.tolist(), slots.tolist(),
                                    rows.tolist())]


class _GroupedLinear(torch.autograd.Function):
    """y = x @ w[e].T + b[e] on padded rows: batch b holds experts' rows as (k, slots, in) blocks.

    Written by hand because plain autograd over per-expert views of a stacked weight
    makes backward materialise a full-size zero gradient per expert (O(E^2) traffic).
    Here each expert's weight gradient is written once into a single stacked buffer, and
    experts without rows cost nothing when that buffer is fresh (it reads as zeros).
    Padding rows must get zero output gradient, so that they add nothing to the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, batches, dnnl, skinny, pool, upcast, batched):
        # x: (R, in), weight: (E, out, in), bias: (E, out); skinny: native.Skinny for few rows per expert, or None;
        # upcast: x's GEMMs in float32, its weights widened batch by batch (no float32 copy of every expert);
        # batched: CpuKernel.mkl_batch_for()'s rows, or None
        ctx.batches, ctx.pool, ctx.skinny, ctx.dnnl, ctx.upcast = batches, pool, skinny, dnnl, upcast
        ctx.has_bias, ctx.batched = bias is not None, batched
        ctx.save_for_backward(x, weight)  # in x's own dtype: upcast widens it again in backward
        return _linear(x, weight, bias, batches, dnnl, skinny, pool, upcast, batched)

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: (R, out)
        x, weight = ctx.saved_tensors
        dtype = x.dtype
        if ctx.upcast:
            x, grad_y = x.float(), grad_y.float()
        grad_x, grad_w, grad_b = _backward(ctx, x, weight, grad_y)
        return _as(grad_x, dtype), grad_w, _as(grad_b, weight.dtype), None, None, None, None, None, None


def _linear(x, weight, bias, batches, dnnl, skinny, pool, upcast, batched):
    """_GroupedLinear's forward without its autograd node (what it computes where no gradient is needed)."""
    if upcast:
        return _forward(x.float(), weight, bias, batches, dnnl, skinny, pool, narrow=x).to(x.dtype)
    return _forward(x, weight, bias, batches, dnnl, skinny, pool, batched=batched)


def _forward(x, weight, bias, batches, dnnl, skinny, pool, narrow=None, batched=None):
    """_GroupedLinear's output in x's dtype (weights of another dtype widened to it per batch); narrow: x in the
    weights' dtype, for the batches under UPCAST_MIN_ROWS rows, which then run unwidened; batched: rows below which
    MKL's GEMMs run as one batched call (MKL_BATCH_ROWS), or None."""
    one = _one_expert(batches)
    if one is not None and (narrow is None or one.slots >= UPCAST_MIN_ROWS):
        # One expert takes every row: its one GEMM, with none of the plan's Python (a tenth of an E = 1 / 64-token
        # float32 forward). oneDNN's own output is the result, not copied into a buffer of ours (a pass over the
        # output: 1-2 % of a one-expert layer); else torch's mm, as the dense FFN's F.linear computes it.
        w_e, b_e = _as(weight[one.first], x.dtype), None if bias is None else _as(bias[one.first], x.dtype)
        if (op := _dnnl_at(dnnl, native.FORWARD, one.slots)) is not None:
            return op(x, w_e, b_e, "none", [], "")
        y, _ = memory.empty((x.shape[0], weight.shape[1]), x.dtype, x.device, pool)
        return torch.mm(x, w_e.t(), out=y) if b_e is None else torch.addmm(b_e, x, w_e.t(), out=y)
    limit = _forward_rows(skinny, x.dtype, weight, batches)
    few = _native_rows(batches, limit)
    y, _ = memory.empty((x.shape[0], weight.shape[1]), x.dtype, x.device, pool)  # (R, out)
    if few:
        _native(skinny, native.FORWARD, few, weight, (x, True), (weight, False), (y, True))
    gemms, biased = mkl.GemmBatch(mkl.function(), MKL_BATCH_MIN_EXPERTS) if batched else None, []
    mm_from = MM_MIN_ROWS[instruction_set()]
    for b in batches:
        rows = slice(b.row, b.row + b.k * b.slots)
        if b.slots <= limit:  # computed natively above: no views of its rows (a few us each, per batch)
            if bias is not None:
                y[rows].view(b.k, b.slots, -1).add_(_experts_view(bias, b).unsqueeze(1))
            continue
        xb, yb = x[rows].view(b.k, b.slots, -1), y[rows].view(b.k, b.slots, -1)
        if narrow is not None and b.slots < UPCAST_MIN_ROWS:
            _linear_per_expert(narrow[rows].view(b.k, b.slots, -1), weight, bias, b, yb)
            continue
        if (op := _dnnl_at(dnnl, native.FORWARD, b.slots)) is not None:
            for j in range(b.k):
                e = b.first + j * b.step
                yb[j].copy_(op(xb[j], _as(weight[e], x.dtype), None if bias is None else _as(bias[e], x.dtype),
                               "none", [], ""))
            continue
        if gemms is not None and b.slots < batched[0]:
            for j in range(b.k):
                gemms.add(xb[j], weight[b.first + j * b.step], yb[j], transpose_b=True)
            biased += [(yb, b)] if bias is not None else []
            continue
        if x.dtype != torch.float32 and (b.step > 1 or mm_from is not None and b.slots >= mm_from):
            # Reduced-precision bmm copies a transposed weight view whose experts are not adjacent (a pair
            # with a gap) into a contiguous temporary first: 16x slower than one mm per expert here.
            _linear_per_expert(xb, weight, bias, b, yb)
            continue
        w = _as(_experts_view(weight, b), x.dtype).transpose(1, 2)  # (k, in, out)
        if bias is None:
            torch.bmm(xb, w, out=yb)
        else:
            torch.baddbmm(_as(_experts_view(bias, b), x.dtype).unsqueeze(1), xb, w, out=yb)
    if gemms is not None:
        gemms.run()
        for yb, b in biased:
            yb.add_(_experts_view(bias, b).unsqueeze(1))
    return y


def _linear_per_expert(xb, weight, bias, b, yb) -> None:
    """yb[j] = xb[j] @ weight[e].T + bias[e] for batch b's experts, one GEMM each in the weights' dtype; written in
    place where yb has that dtype, else rounded into it (a float32-compute output)."""
    for j in range(b.k):
        e = b.first + j * b.step
        if yb.dtype != weight.dtype:
            yb[j].copy_(torch.nn.functional.linear(xb[j], weight[e], None if bias is None else bias[e]))
        elif bias is None:
            torch.mm(xb[j], weight[e].t(), out=yb[j])
        else:
            torch.addmm(bias[e], xb[j], weight[e].t(), out=yb[j])


def _backward(ctx, x, weight, grad_y):
    """_GroupedLinear's gradients for x (in its dtype), the weight (in its own) and the bias (in x's)."""
    batches, skinny = ctx.batches, ctx.skinny
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_y = grad_y.contiguous()
    one = _one_expert(batches)
    if weight.shape[0] == 1 and one is not None:
        # E = 1, as in the forward: each gradient one GEMM. oneDNN's fresh results are the gradients, not copied into
        # buffers of ours (a pass over the weight's gradient: 0.2-0.5 ms of a 64-token step of t5-small's FFN); MKL's
        # write into them. The weight's comes out in its own (out, in) layout, where the dense FFN's autograd
        # computes its transpose and copies it.
        op, op_w = (_dnnl_at(ctx.dnnl, gemm, one.slots) for gemm in (native.INPUT_GRAD, native.WEIGHT_GRAD))
        grad_x = grad_w = None
        if need_x:
            w = _as(weight[0], x.dtype)
            grad_x = op(grad_y, w.t(), None, "none", [], "") if op else \
                torch.mm(grad_y, w, out=memory.empty(tuple(x.shape), x.dtype, x.device, ctx.pool)[0])
        if need_w and op_w:
            grad_w = _as(op_w(grad_y.t(), x.t(), None, "none", [], ""), weight.dtype).unsqueeze(0)
        elif need_w:
            grad_w = gradient_buffer(weight, ctx.pool)[0]
            if grad_w.dtype == x.dtype:
                _weight_grad(grad_y, x, grad_w[0], skinny, ctx.pool)
            else:
                grad_w[0].copy_(grad_y.t().mm(x))
        return (grad_x, grad_w,
                grad_y.sum(0, keepdim=True) if need_b and ctx.has_bias else None)
    grad_x = memory.empty(tuple(x.shape), x.dtype, x.device, ctx.pool)[0] if need_x else None  # (R, in)
    grad_w, w_zero = gradient_buffer(weight, ctx.pool) if need_w else (None, True)  # (E, out, in)
    grad_b = x.new_zeros(weight.shape[:2]) if need_b and ctx.has_bias else None  # (E, out), in x's dtype
    _, x_rows, w_rows = native_max_rows(skinny, x.dtype, weight.dtype, *weight.shape[1:])
    few_x = _native_rows(batches, x_rows) if grad_x is not None else None
    few_w = _native_rows(batches, w_rows) if grad_w is not None else None
    if few_x:
        _native(skinny, native.INPUT_GRAD, few_x, weight, (grad_y, True), (weight, False), (grad_x, True))
    if few_w:
        _native(skinny, native.WEIGHT_GRAD, few_w, weight, (grad_y, True), (x, True), (grad_w, False))
    covered = [False] * weight.shape[0]
    # MKL's batched GEMM takes the input gradient only where out > in (MKL_BATCH_ROWS)
    gemms = mkl.GemmBatch(mkl.function(), MKL_BATCH_MIN_EXPERTS) if ctx.batched and weight.shape[1] > weight.shape[2] \
        else None
    for b in batches:
        for j in range(b.k):
            covered[b.first + j * b.step] = True
        if (grad_x is None or b.slots <= x_rows) and (grad_w is None or b.slots <= w_rows) and grad_b is None:
            continue  # computed natively above: no views of its rows
        rows = slice(b.row, b.row + b.k * b.slots)
        g, xb = grad_y[rows].view(b.k, b.slots, -1), x[rows].view(b.k, b.slots, -1)  # (k, slots, out / in)
        # oneDNN's linear takes both backward GEMMs as transposed views, at twice MKL's rate on AVX-512 (the same as
        # its forward; docs/performance.md); its results are fresh tensors, copied into place.
        experts = range(b.first, b.first + b.k * b.step, b.step)
        if grad_x is not None and b.slots > x_rows:
            gx = grad_x[rows].view(b.k, b.slots, -1)
            if (dnnl := _dnnl_at(ctx.dnnl, native.INPUT_GRAD, b.slots)) is None and x.dtype != torch.float32 \
                    and b.step > 1:
                # As in the forward, reduced-precision bmm copies a weight view whose experts are not adjacent into a
                # contiguous temporary first (bfloat16 on AMX, 2 experts of 20 rows: 0.48 ms against 0.29 for one mm
                # per expert; 9-17 ms of copies in an E 64 / 1,024-token training step; docs/performance.md).
                for j, e in enumerate(experts):
                    torch.mm(g[j], _as(weight[e], x.dtype), out=gx[j])
            elif dnnl is None and gemms is not None and b.slots < ctx.batched[1]:
                for j, e in enumerate(experts):
                    gemms.add(g[j], weight[e], gx[j], transpose_b=False)
            elif dnnl is None:
                torch.bmm(g, _as(_experts_view(weight, b), x.dtype), out=gx)
            else:
                for j, e in enumerate(experts):
                    gx[j].copy_(dnnl(g[j], _as(weight[e], x.dtype).t(), None, "none", [], ""))
        if grad_w is not None and b.slots > w_rows:
            if (dnnl := _dnnl_at(ctx.dnnl, native.WEIGHT_GRAD, b.slots)) is None and grad_w.dtype == x.dtype:
                _weight_grad(g, xb, _experts_view(grad_w, b), skinny, ctx.pool)
            elif dnnl is None:
                _experts_view(grad_w, b).copy_(torch.bmm(g.transpose(1, 2), xb))
            else:
                for j, e in enumerate(experts):
                    grad_w[e].copy_(dnnl(g[j].t(), xb[j].t(), None, "none", [], ""))
        if grad_b is not None:
            torch.sum(g, dim=1, out=_experts_view(grad_b, b))
    if gemms is not None:
        gemms.run()
    if grad_w is not None and not w_zero:
        # Zero the uncovered experts, one call per run of them: with the native loops' streamed stores, else by
        # writing zeros where most experts have rows and by handing their pages back where few do
        # (ZERO_BY_WRITING_MIN_COVERED).
        if skinny is not None:
            zero = skinny.zero_
        else:
            zero = torch.Tensor.zero_ if sum(covered) >= ZERO_BY_WRITING_MIN_COVERED * len(covered) else zero_pages_
        e = 0
        while e < len(covered):
            start = e
            while e < len(covered) and not covered[e]:
                e += 1
            if e > start:
                zero(grad_w[start:e])
            e += 1
    return grad_x, grad_w, grad_b


def _bmm_at_any_rows(dtype: torch.dtype) -> bool:
    """Whether GEMMs in `dtype` take bmm at any rows per expert here: reduced precision where MM_MIN_ROWS is None (the
    AMX machine)."""
    return dtype != torch.float32 and MM_MIN_ROWS[instruction_set()] is None


def _lays_out(g: torch.Tensor, skinny: native.Skinny | None) -> bool:
    """Whether the weight gradient's GEMMs take their transposed operand laid out by the native loops' transposing
    copy: where reduced-precision GEMMs run bmm at any rows (_bmm_at_any_rows). oneDNN's GEMMs over the transposed view
    ran at half the rate there (8 experts of 1,024 rows: 1,093 -> 2,632 GFLOP/s where out > in, 1,099 -> 2,077 where
    out <= in; one expert of 8,192 x 512 rows: 15.4 -> 9.2 ms; the copy of 8 x 1,154 x 2,048 bfloat16 3-9 ms, torch's
    of the view 63-72; docs/performance.md)."""
    return skinny is not None and _bmm_at_any_rows(g.dtype)


def _transposed(g: torch.Tensor, skinny: native.Skinny | None, pool: bool) -> torch.Tensor:
    """g.transpose(-2, -1) for the weight gradient's GEMM: laid out where _lays_out, else the view."""
    if not _lays_out(g, skinny):
        return g.transpose(-2, -1)
    shape = (*g.shape[:-2], g.shape[-1], g.shape[-2])
    return skinny.transpose(g, memory.empty(shape, g.dtype, g.device, pool)[0])


def _weight_grad(g: torch.Tensor, x: torch.Tensor, out: torch.Tensor, skinny: native.Skinny | None,
                 pool: bool) -> None:
    """out (..., out, in) = g.T @ x for g (..., R, out) and x (..., R, in): one expert's GEMM, or a batch of experts'.
    Where the operand is laid out, x.T @ g and its (..., in, out) result transposed into place instead, where those two
    copies move at most half the elements of g's. bfloat16 on the AMX machine, t5's FFN (out 2,048 > in 512), in
    interleaved training steps: one expert of 8,192 rows 0.91x the time (the copy of g took 7 ms from memory, of x
    1.7, of the result 0.1-0.3); 8 experts of 1,163 rows (copies 0.69x g's) 1.00x; 32 of 307 rows (1.9x) 1.03x."""
    gemm = torch.mm if g.dim() == 2 else torch.bmm
    rows, n_out, n_in = g.shape[-2], g.shape[-1], x.shape[-1]
    if 2 * (rows + n_out) * n_in > rows * n_out or not out.is_contiguous() or not _lays_out(g, skinny):
        gemm(_transposed(g, skinny, pool), x, out=out)
        return
    t = memory.empty((*x.shape[:-2], n_in, n_out), g.dtype, g.device, pool)[0]
    skinny.transpose(gemm(_transposed(x, skinny, pool), g, out=t), out)


def _one_on_torch(kernel: CpuKernel, rows: int, out: int, in_: int, like: torch.Tensor, grad: bool,
                  ffn: bool = False) -> bool:
    """Whether one expert's linear, (rows, in_) -> (rows, out) in like's dtype and device (with its gradients where
    `grad`), runs as the dense FFN's F.linear: computed in its own dtype, on GEMMs the plan would give torch's mm
    (_plan_runs_mm), and with no tensor the recycled buffers would hold: its output, or in training its input's
    gradient (bfloat16, E 1 / 1,024 tokens: the down projection's, 4 MiB; through the plan, whose weight gradient
    also takes its operand laid out, the training step took 1.09-1.11x dense's time against 1.17-1.18x through
    F.linear; sixteenth session). `ffn`: whether both of an FFN's linears do, this one and its transpose's
    ((rows, out) -> (rows, in_)): the same test with the other output."""
    if kernel.upcasts(like) or not _plan_runs_mm(kernel.dnnl_for(like.dtype, like.device), rows, grad):
        return False
    return not (kernel.pool and memory.pools((rows, max(out, in_) if grad or ffn else out), like.dtype, like.device))


def _plan_runs_mm(dnnl: tuple | None, rows: int, grad: bool) -> bool:
    """Whether the plan would run one expert's GEMMs on torch's mm: oneDNN takes no GEMM in x's dtype here
    (CpuKernel.dnnl_for's None), or none of those the plan would run at x's rows (the forward; in training its two
    gradients too)."""
    gemms = (native.FORWARD, native.INPUT_GRAD, native.WEIGHT_GRAD)[:3 if grad else 1]
    return dnnl is None or all(_dnnl_at(dnnl, gemm, rows) is None for gemm in gemms)


def _relu_(h: torch.Tensor, p: float, skinny: native.Skinny | None) -> torch.Tensor:
    """_ReLU's forward without its autograd node: relu, then dropout(p) where skinny runs it, on h in place."""
    if skinny is None:
        return torch.relu_(h)
    if p == 0:
        skinny.relu_dropout(native.RELU, h, None, h, p)
    else:
        skinny.relu_dropout(native.RELU_DROPOUT, h, None, h, p, seed=int(torch.randint(2 ** 62, ())))
    return h


def _gather(x: torch.Tensor, index: torch.Tensor, pool: bool) -> torch.Tensor:
    """x.index_select(0, index), into a recycled buffer where `pool` and the result is large enough for one
    (memory.pools), its gradient's scatter too (_PooledGather): a fresh result faults its pages in at every step (E 8 /
    8,192 bfloat16 forward: the padded gather of x 2.3 ms and the unpadding gather of y 1.1, against 0.7 for the same
    gather into a recycled buffer). The same ops either way: the same bits."""
    if not (pool and memory.pools((index.shape[0], *x.shape[1:]), x.dtype, x.device)):
        return x.index_select(0, index)
    return _PooledGather.apply(x, index) if records_grad(x) else _pooled_gather(x, index)


def _pooled_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x.index_select(0, index) written into a recycled buffer."""
    return torch.index_select(x, 0, index, out=memory.empty((index.shape[0], *x.shape[1:]), x.dtype, x.device)[0])


class _PooledGather(torch.autograd.Function):
    """_gather's autograd node: the rows into a recycled buffer, and the gradient added back into one (index_add_ onto
    zeros, as torch's own index_select backward)."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return _pooled_gather(x, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out, is_zero = memory.empty((ctx.rows, *grad.shape[1:]), grad.dtype, grad.device)
        if not is_zero:
            out.zero_()
        return out.index_add_(0, index, grad), None


class _ReLU(torch.autograd.Function):
    """ReLU in place on a _GroupedLinear output (a fresh buffer autograd saved nowhere), its gradient in a pooled
    buffer: a fresh (R, d_ff) tensor either way costs first-touch page faults, a tenth of a large layer's forward
    and 6 % of a bfloat16 training step at E = 8 / 8192 tokens (docs/performance.md).

    With `skinny`, the native loops run it (native.relu_dropout), and dropout(p) too in the same pass: torch's dropout
    on CPU draws a Bernoulli per element (with the ReLU 14-29 ms on a (1024, 2048) hidden here, against 0.4-0.7 ms).
    Its mask is a hash of a seed drawn from torch's generator (so torch.manual_seed repeats it) and of each element's
    index, and the backward needs none: the output is positive exactly where both gradients pass."""

    @staticmethod
    def forward(ctx, h, pool, p, skinny):
        ctx.mark_dirty(h)
        ctx.pool, ctx.p, ctx.skinny = pool, p, skinny
        ctx.save_for_backward(_relu_(h, p, skinny))
        return h

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        out, _ = memory.empty(tuple(grad.shape), grad.dtype, grad.device, ctx.pool)
        if ctx.skinny is None:
            torch.ops.aten.threshold_backward.grad_input(grad, y, 0, grad_input=out)
        else:
            ctx.skinny.relu_dropout(native.RELU_GRAD if ctx.p == 0 else native.RELU_DROPOUT_GRAD, grad.contiguous(), y,
                                    out, ctx.p)
        return out, None, None, None


class DenseLayout:
    """One expert whose FFN runs as the dense FFN (Layout.dense): its rows as they are, torch's F.linear and ReLU.
    Experts runs that itself; these methods serve grouped_linear and tests."""

    dense = True

    def pad(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return x if rows is None else x.index_select(0, rows)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return one_expert_linear(x, weight, bias)

    def relu(self, h: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        h = torch.relu_(h)
        return torch.nn.functional.dropout(h, dropout, training=True) if dropout else h


_DENSE = DenseLayout()


class CpuLayout:
    """Maps rows grouped by expert, (N, d), to the padded rows of a plan, (R, d), and back."""

    dense = False

    def __init__(self, counts: list[int], weight: torch.Tensor, kernel: CpuKernel) -> None:
        self.kernel = kernel
        self.n = sum(counts)
        if len(counts) == 1:  # one expert: its rows as they are, planned without numpy (E = 1 layers are small)
            self.batches, self.rows, self.identity = [_Batch(0, 1, 1, self.n, 0)] if self.n else [], self.n, True
            return
        device, batching = weight.device, kernel.batching
        if batching == "auto" and kernel.dnnl_for(kernel.compute(weight), device):
            # Where oneDNN takes the GEMMs they run one call per expert in any plan, and the native loops one call
            # for all of their experts: padding is then work for nothing, and batching saves no calls. Measured on
            # AVX2, float32 forward + backward at 64-8192 tokens over 8-256 experts: 0.94-1.05x of pairs' time, where
            # the cost model's choice of one span took 1.13-1.29x at E 128 / 256, 1024 tokens (docs/performance.md).
            batching = "each"
        elif batching == "auto" and self._span_pays(counts, weight):
            batching = "span"
        self.batches = _plan(counts, weight.shape[1] * weight.shape[2], batching)
        self.rows = sum(b.k * b.slots for b in self.batches)
        # One unpadded batch (one expert, or a span of experts with equal counts) is the identity: then pad and unpad
        # are free. Otherwise it is when no expert's rows move; the indices in numpy, as _experts_of (torch ops on
        # these small tensors cost ten times as much).
        self.identity = len(self.batches) <= 1 and self.rows == self.n
        if self.identity:
            return
        c = np.asarray(counts, dtype=np.int64)
        starts = np.cumsum(c) - c  # (E,) each expert's first row
        order, first_rows, slots = _experts_of(self.batches)  # experts in padded order
        base = np.zeros_like(c)  # (E,) padded row of each expert's first row
        base[order] = first_rows
        self.identity = self.rows == self.n and bool((base == starts)[c > 0].all())
        if self.identity:
            return
        group = np.repeat(np.arange(len(c)), c)  # (N,) expert of each row
        self.index = torch.from_numpy(np.arange(self.n) + (base - starts)[group]).to(device)  # (N,) row's slot
        # Padding slots repeat the expert's last row rather than holding zeros: one gather, no
        # fill. Their output is dropped by unpad, so their gradient is exactly zero and they
        # add nothing to the weight gradient.
        slot_expert = np.repeat(order, slots)
        last = np.minimum(np.arange(self.rows) - base[slot_expert], c[slot_expert] - 1)
        source = (starts[slot_expert] + last).clip(0, self.n - 1)  # (R,) row each slot copies
        self.source = torch.from_numpy(source).to(device)

    def _span_pays(self, counts: list[int], weight: torch.Tensor) -> bool:
        """Whether one bmm over the span of experts, padded to the busiest, beats the cost model's pairs: where
        reduced-precision GEMMs take bmm at any rows (MM_MIN_ROWS None: pairs of experts apart run one mm each, at
        half bmm's rate), the busiest expert has more rows than the native forward takes, and the padding stays
        under SPAN_MAX_PADDING."""
        if not _bmm_at_any_rows(weight.dtype) or self.kernel.upcasts(weight):
            return False
        used = [e for e, c in enumerate(counts) if c]
        skinny = self.kernel.skinny_for(weight.dtype, weight.device, weight)
        top = max(counts, default=0)
        if not used or top <= native_max_rows(skinny, weight.dtype, weight.dtype, *weight.shape[1:])[0]:
            return False
        return (used[-1] + 1 - used[0]) * top <= SPAN_MAX_PADDING * self.n

    def pad(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:  # (N, d) -> (R, d)
        if rows is None:
            return x.contiguous() if self.identity else _gather(x, self.source, self.kernel.pool)
        # The caller's gather and the padding's as one (and one index_add in the backward, not two).
        return _gather(x, rows if self.identity else rows.index_select(0, self.source), self.kernel.pool)

    def unpad(self, y: torch.Tensor) -> torch.Tensor:  # (R, d) -> (N, d)
        return y if self.identity else _gather(y, self.index, self.kernel.pool)

    def relu(self, h: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        # One expert taking every row keeps torch's dropout, as linear() keeps the dense FFN's GEMM: a conversion to
        # one expert then draws the dense model's masks (the same seed gives the same outputs in training mode).
        if dropout:
            skinny = self.kernel.skinny_dropout(h, dropout) if _one_expert(self.batches) is None else None
        else:
            skinny = self.kernel.skinny_relu(h)
        # The custom node only where it does what torch's relu_ does not: the native loops, or its gradient in a
        # recycled buffer. Elsewhere torch's own node, the same bits without the node's Python (float32, E 1 / 64
        # tokens: the layer's training step 1.09x dense against 1.14x, interleaved; eighteenth session).
        pooled = self.kernel.pool and memory.pools(tuple(h.shape), h.dtype, h.device)
        if records_grad(h) and (skinny is not None or pooled):
            y = _ReLU.apply(h, self.kernel.pool, dropout, skinny)
        else:
            y = _relu_(h, dropout, skinny)
        return torch.nn.functional.dropout(y, dropout, training=True) if dropout and skinny is None else y

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # One expert taking every row stays off the native loops: its forward then computes what the dense FFN's
        # F.linear does, so a conversion to one expert preserves the model's outputs (bit for bit on AVX-512; on AVX2
        # oneDNN's and MKL's float32 sums run in different orders, within rounding).
        if weight.shape[0] == 1 and _one_on_torch(self.kernel, x.shape[0], weight.shape[1], x.shape[1], x,
                                                  records_grad(x, weight, bias)):
            # One expert on torch's own GEMMs is the dense FFN: F.linear itself, without the plan's autograd Function
            # and its Python (bfloat16, E = 1 at 64 tokens: a forward 1.4 ms through the plan, 1.1 this way; where
            # oneDNN's linear runs float32 the plan keeps it: 0.78x dense at 8,192 tokens, F.linear 0.96x). In bfloat16
            # it still beats the plan's own one-expert GEMMs (E 1 / 64 tokens: forward 0.62 ms against 0.65, training
            # 2.32 against 2.51; thirteenth session; in float32 F.linear's training step took 1.10-1.40x theirs then,
            # and measured faster since: below).
            # Not where the output is large enough for the recycled buffers: the plan's GEMMs write into those, where
            # F.linear's fresh output faults its pages in (bfloat16, E 1 / 8,192 tokens: the plan's forward took 0.59x
            # F.linear's time, training 0.79x; 1,024 tokens training 0.86x; fifteenth session). The same mm either way.
            # Where oneDNN runs float32, one expert comes here at rows where the plan would not give it a GEMM: there
            # F.linear measured faster in training too (AMX, E 1 / 64 tokens: forward 1.15-1.17x dense against
            # 1.18-1.25x through the plan, training 1.14-1.15x against 1.20-1.24x; 256 tokens training 1.07-1.08x
            # against 1.09x; seventeenth session).
            return one_expert_linear(x, weight, bias)
        one = _one_expert(self.batches) is not None
        upcast = self.kernel.upcasts(x)
        compute = torch.float32 if upcast else x.dtype  # the kernel's paths are chosen for compute
        dnnl = self.kernel.dnnl_for(compute, x.device)
        batched = self.kernel.mkl_batch_for(compute, weight.dtype, x.device)
        # One expert of several stays off the native loops; an E = 1 layer keeps them for its weight gradient's
        # transposing copy (_transposed), its GEMMs being torch's either way.
        skinny = None if one and weight.shape[0] > 1 else self.kernel.skinny_for(compute, x.device, weight)
        args = (x.contiguous(), weight, bias, self.batches, dnnl, skinny, self.kernel.pool, upcast, batched)
        return _GroupedLinear.apply(*args) if records_grad(x, weight, bias) else _linear(*args)


class _RouterLogits(torch.autograd.Function):
    """x @ weight.T in float32 from bfloat16 x as it lies, and its gradients, on the native loops
    (native.Skinny.router_logits): torch's path widens x into a float32 copy (kept for the weight's gradient), runs a
    GEMM of E columns, and computes the input's gradient in float32 to round it again."""

    @staticmethod
    def forward(ctx, x, weight, skinny):
        ctx.skinny = skinny
        ctx.save_for_backward(x, weight)
        return skinny.router_logits(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return (*ctx.skinny.router_grads(grad.contiguous(), x, weight, *ctx.needs_input_grad[:2]), None)


# Per machine class, from this many tokens the native loops compute a one-expert router's logits. Below it on the AMD
# EPYC (avx512) torch's GEMV is as fast and its autograd has no Python (bfloat16 x, d_model 512, alone: 64 tokens
# forward 8.2 us against 8.5, training 85 against 110; at 96 tokens torch's forward takes 61 us against 9, training 106
# against 104; with 2-16 experts the native loops are faster from 16 tokens). On the AMX machine the native logits
# made an E 1 / 64-token layer's forward 0.96x (fifteenth session): every row there.
ROUTER_ONE_MIN_ROWS = {"avx512": 96}


@dataclass(frozen=True)
class CpuKernel:
    """batching: "auto" (each expert alone where oneDNN runs the GEMMs, else the cost model's choice), "span"
    (one bmm), "pairs" or "each" (_plan); dnnl_min_rows: rows per expert from which the forward and the backward take
    oneDNN's linear (default: DNNL_ROWS for this machine); dnnl: whether to use it at all (when the probe finds it);
    native: the hand-written kernels (native.py) for experts with up to native_max_rows() rows, when this machine
    builds them;
    pool: large buffers from moeify.layers.memory's recycled huge-page mappings, else torch.empty;
    upcast: reduced-precision GEMMs computed in float32: None where reduced_is_native() says torch has no fast path for
    the dtype here, True always (tests), False never; mkl_batch: MKL's GEMMs of experts alone as one batched call
    (MKL_BATCH_ROWS) where torch exports it (mkl.py). Each trick can be switched off, which is how
    benchmarks/bench_kernels.py measures what it buys."""

    batching: str = "auto"
    dnnl_min_rows: int | None = None  # every GEMM from this many rows; None: DNNL_ROWS here (bfloat16: never)
    dnnl: bool = True
    native: bool = True
    pool: bool = True
    upcast: bool | None = None
    mkl_batch: bool = True
    name: str = "cpu"

    def upcasts(self, x: torch.Tensor) -> bool:
        """Whether x's GEMMs run in float32 on widened operands (reduced precision without a fast path here)."""
        if self.upcast is False or x.dtype not in _NATIVE_REDUCED or x.device.type != "cpu":
            return False
        return self.upcast or not reduced_is_native(x.dtype)

    def compute(self, x: torch.Tensor) -> torch.dtype:
        """The dtype x's GEMMs run in: float32 where upcasts(x), else x's own."""
        return torch.float32 if self.upcasts(x) else x.dtype

    def dnnl_for(self, dtype: torch.dtype, device: torch.device) -> tuple | None:
        """(op, rows of the forward, of the input gradient, of the weight gradient: DNNL_ROWS's ranges) when GEMMs in
        dtype may take oneDNN's linear, else None. bfloat16 takes it only when dnnl_min_rows says so (tests do) and
        oneDNN has a bfloat16 path here."""
        rows = ((self.dnnl_min_rows, None),) * 3 if self.dnnl_min_rows else DNNL_ROWS[instruction_set()].get(dtype)
        if not (self.dnnl and rows and dtype in (torch.float32, torch.bfloat16) and device.type == "cpu"
                and torch.backends.mkldnn.enabled) or dtype != torch.float32 and not reduced_is_native(dtype):
            return None
        op = dnnl_op()
        return None if op is None else (op, *rows)

    def mkl_batch_for(self, compute: torch.dtype, dtype: torch.dtype, device: torch.device) -> tuple | None:
        """MKL_BATCH_ROWS's (forward, input gradient) rows for GEMMs computed in `compute` on weights in `dtype` where
        MKL's batched GEMM runs them here, else None."""
        rows = MKL_BATCH_ROWS.get(instruction_set(), {}).get(compute) if compute == dtype else None
        return rows if self.mkl_batch and rows and device.type == "cpu" and mkl.function() is not None else None

    def skinny_for(self, compute: torch.dtype, device: torch.device, weight: torch.Tensor) -> native.Skinny | None:
        """The native kernels when they may run a linear computed in `compute` on `weight` (a pair of dtypes they
        have, a contiguous weight with sizes in multiples of 16), else None."""
        if not (self.native and (compute, weight.dtype) in native.MODES and device.type == "cpu"
                and weight.is_contiguous() and weight.shape[1] % 16 == 0 and weight.shape[2] % 16 == 0):
            return None
        return native.skinny()

    def skinny_relu(self, h: torch.Tensor) -> native.Skinny | None:
        """The native loops when they may run relu on h in place: bfloat16 only, where torch's relu_ and its gradient
        widen every element (a (10240, 2048) hidden: 1.0 ms against 4-11, its gradient 4.2 against 6.6; float32:
        equal; docs/performance.md)."""
        if not (self.native and h.dtype == torch.bfloat16 and h.device.type == "cpu" and h.is_contiguous()):
            return None
        return native.skinny()

    def skinny_dropout(self, h: torch.Tensor, p: float) -> native.Skinny | None:
        """The native loops when they may run relu + dropout(p) on h in place, else None."""
        if not (self.native and 0 < p < 1 and h.dtype in native.DROPOUT_DTYPES and h.device.type == "cpu"
                and h.is_contiguous()):
            return None
        return native.skinny()

    def layout(self, counts: Counts, weight: torch.Tensor) -> CpuLayout | DenseLayout:
        counts = host_counts(counts)
        # Where both of an FFN's linears (this weight's and its transpose's) would take the dense FFN's F.linear
        # (_one_on_torch; autograd's gradients counted wherever it may record), that is decided here once, not per op:
        # in a layer each decision's Python runs just after a GEMM, with cold caches, at about ten times its cost
        # alone. With Experts calling F.linear itself (Layout.dense), float32 E 1 / 64 tokens: the forward 1.14-1.16x
        # dense against 1.17-1.20x, two bench_layer runs each way (eighteenth session).
        if len(counts) == 1 and counts[0] and _one_on_torch(self, counts[0], *weight.shape[1:], weight,
                                                            torch.is_grad_enabled(), ffn=True):
            return _DENSE
        return CpuLayout(counts, weight, self)

    def router_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The router's logits: on the native loops for bfloat16 x and a float32 weight of up to
        native.ROUTER_MAX_EXPERTS experts (never while tracing or compiling), else F.linear on x widened. In bfloat16
        layers on the AMX machine, against F.linear (interleaved, fifteenth session): forward 0.92-0.93x at E 1 and 8
        / 8,192 tokens, 0.96x at 64 and 1,024; training 0.94-0.99x. float32 x needs no copy, and keeps torch's bits."""
        # The dtype first: a float32 layer's router then asks nothing else (its Python runs after a GEMM, cold). Tracing
        # before any shape: a traced shape compared in Python warns, and would bake this call's choice into the trace.
        skinny = x.dtype == torch.bfloat16 and self.native and not torch.jit.is_tracing() and (
            weight.shape[0] > 1 or x.shape[0] >= ROUTER_ONE_MIN_ROWS.get(instruction_set(), 0)) and \
            not torch.compiler.is_compiling() and weight.dtype == torch.float32 and \
            x.device.type == "cpu" and x.dim() == 2 and weight.shape[0] <= native.ROUTER_MAX_EXPERTS and \
            x.shape[1] % 32 == 0 and native.skinny()
        if not skinny:
            return router_logits(x, weight)
        x, weight = x.contiguous(), weight.contiguous()
        return _RouterLogits.apply(x, weight, skinny) if records_grad(x, weight) else skinny.router_logits(x, weight)
