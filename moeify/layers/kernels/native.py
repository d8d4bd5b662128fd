"""The cpu kernel's hand-written GEMMs for few rows per expert (skinny.cpp): built on first use with the system C++
compiler into a per-user cache, for the widest instruction set this CPU runs (AVX-512 with AMX tiles, AVX-512, else
AVX2 with FMA), loaded
with ctypes, and None wherever that cannot be done (no compiler, none of those instruction sets, a wrong result on the
probe): the cpu kernel then takes torch's paths, silently."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("skinny.cpp")
# -fno-trapping-math: nothing here reads floating-point exception flags, and without it the compiler will not turn
# the dropout loops' selects into vector blends (they ran 10-25x slower, scalar).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-trapping-math")
# Builds of the one source, widest first; each library says whether this CPU runs it (moeify_skinny_supported). The
# AMX build is the AVX-512 one plus the bfloat16 forward and weight gradient on AMX tiles.
_AVX512 = ("-mavx512f", "-mavx512bf16", "-mfma")
VARIANTS = {"amx": (*_AVX512, "-mamx-tile", "-mamx-bf16"), "avx512": _AVX512, "avx2": ("-mavx2", "-mfma")}
ROUTER_MAX_EXPERTS = 16  # skinny.cpp's, for the router's logits
FORWARD, INPUT_GRAD, WEIGHT_GRAD = 0, 1, 2  # y = x @ w.T, gx = g @ w, gw = g.T @ x
# y = relu(h) * keep / (1 - p); gh = (y > 0) * g / (1 - p); y = relu(h); gh = (y <= 0 ? 0 : g), as torch's
RELU_DROPOUT, RELU_DROPOUT_GRAD, RELU, RELU_GRAD = 0, 1, 2, 3
DROPOUT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
# (activations' dtype, weights' dtype) -> the library's code: float32 activations on bfloat16 weights are the
# float32 compute of the cpu kernel's upcast (x, y, g, gx widened; w read and gw written in bfloat16).
MODES = {(torch.float32, torch.float32): 0, (torch.bfloat16, torch.bfloat16): 1, (torch.float32, torch.bfloat16): 2}
BUILD_SECONDS = 120


def cache_dir() -> Path:
    """Where built kernels are kept: $MOEIFY_CACHE_DIR, else $XDG_CACHE_HOME/moeify, else ~/.cache/moeify."""
    if os.environ.get("MOEIFY_CACHE_DIR"):
        return Path(os.environ["MOEIFY_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeify"


@functools.cache
def torch_reports_amx() -> bool | None:
    """Whether torch reports AMX tiles on this CPU; None where its check (a private one) is missing or fails."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return None


def candidates() -> list[str]:
    """The variants worth building here, widest first: AVX-512 only where torch found it on this CPU, AMX only where
    torch does not say the CPU lacks tiles (building one elsewhere costs a compile for a library that would refuse to
    run; where torch cannot say, the AMX library's own check decides)."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return ["avx2"]
    return list(VARIANTS) if torch_reports_amx() is not False else ["avx512", "avx2"]


def build(variant: str) -> Path | None:
    """The compiled library, built once per source, variant, flags and compiler (the file name holds their digest);
    None when there is no compiler ($CXX, else c++) or it fails. Written to a temporary name, then renamed: two
    processes building at once (torchrun's ranks) each finish with a whole file."""
    compiler = shutil.which(os.environ.get("CXX") or "c++")
    if compiler is None or not SOURCE.is_file():
        return None
    flags = (*FLAGS, *VARIANTS[variant])
    key = hashlib.sha256(SOURCE.read_bytes() + repr((flags, compiler, platform.machine())).encode()).hexdigest()[:16]
    target = cache_dir() / f"skinny-{variant}-{key}.so"
    if target.is_file():
        return target
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([compiler, *flags, "-o", str(temporary), str(SOURCE)], check=True, capture_output=True,
                       timeout=BUILD_SECONDS)
        os.replace(temporary, target)
    except (OSError, subprocess.SubprocessError):
        temporary.unlink(missing_ok=True)
        return None
    return target


class Skinny:
    """The loaded library of one variant: run(op, dtype, rows, a, b, c, ...) over a list of experts."""

    def __init__(self, lib: ctypes.CDLL, variant: str) -> None:
        self.variant = variant
        self.fn = lib.moeify_skinny
        self.fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
        self.fn.restype = ctypes.c_int
        self.dropout_fn = lib.moeify_dropout
        self.dropout_fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, ctypes.c_int]
        self.dropout_fn.restype = ctypes.c_int
        self.zero_fn = lib.moeify_zero
        self.zero_fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
        self.zero_fn.restype = ctypes.c_int
        self.transpose_fn = lib.moeify_transpose
        self.transpose_fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                                      ctypes.c_int, ctypes.c_int]
        self.transpose_fn.restype = ctypes.c_int
        self.router_fn = lib.moeify_router_logits
        self.router_fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                   ctypes.c_long, ctypes.c_long, ctypes.c_int]
        self.router_fn.restype = ctypes.c_int
        self.router_grads_fn = lib.moeify_router_grads
        self.router_grads_fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                                         ctypes.c_int]
        self.router_grads_fn.restype = ctypes.c_int
        self.release_fn = lib.moeify_release
        self.release_fn.argtypes = [ctypes.c_int]
        self.release_fn.restype = ctypes.c_long

    def release(self) -> int:
        """Frees the operand buffers that the calling thread and its team of torch.get_num_threads() threads keep
        between calls (the next call lays them out afresh); returns the bytes the calling thread held."""
        return self.release_fn(torch.get_num_threads())

    def relu_dropout(self, op: int, src: torch.Tensor, y: torch.Tensor | None, dst: torch.Tensor, p: float,
                     seed: int = 0) -> None:
        """op RELU_DROPOUT: dst = relu(src), each element kept with probability 1 - p (a hash of seed and its index
        against p * 2^32) and scaled by 1 / (1 - p), else 0; dst may be src. RELU_DROPOUT_GRAD: dst = src / (1 - p)
        where y (that op's output) > 0, else 0. RELU: dst = relu(src), dst may be src; RELU_GRAD: dst = src where y is
        not <= 0 (NaN included, as torch's threshold_backward), else 0; both ignore p and seed. Contiguous tensors of
        one dtype in DROPOUT_DTYPES; 0 < p < 1 for the dropout ops."""
        threshold = min(round(p * 2 ** 32), 2 ** 32 - 1)
        status = self.dropout_fn(op, DROPOUT_DTYPES[src.dtype], src.numel(), src.data_ptr(),
                                 None if y is None else y.data_ptr(), dst.data_ptr(), seed % 2 ** 64, threshold,
                                 1.0 / (1.0 - p), torch.get_num_threads())
        if status:
            raise ValueError(f"skinny kernel refused dropout op {op}")

    def zero_(self, t: torch.Tensor) -> torch.Tensor:
        """t.zero_() for a contiguous CPU tensor, with non-temporal stores: about 3x torch's rate on large tensors, and
        the zeros are not left in the cache. The GIL is released while it runs."""
        assert t.is_contiguous() and t.device.type == "cpu"
        if self.zero_fn(t.data_ptr(), t.numel() * t.element_size(), torch.get_num_threads()):
            raise ValueError("skinny kernel refused to zero")
        return t

    def transpose(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """dst = src.transpose(-2, -1) for contiguous CPU tensors of 2- or 4-byte elements, dst (..., cols, rows) of
        src (..., rows, cols). 2-byte elements in registers on AVX-512 (bfloat16 on the AMX machine: 3.5-22x faster
        than torch's copy of the transposed view, about a plain copy's time), 4-byte ones a scalar loop (the probe's
        check only). The GIL is released."""
        assert src.is_contiguous() and dst.is_contiguous() and src.dtype == dst.dtype and src.device.type == "cpu"
        assert dst.shape == (*src.shape[:-2], src.shape[-1], src.shape[-2]) and src.element_size() in (2, 4)
        rows, cols = src.shape[-2:]
        if self.transpose_fn(src.data_ptr(), dst.data_ptr(), src.numel() // max(rows * cols, 1), rows, cols,
                             src.element_size(), torch.get_num_threads()):
            raise ValueError("skinny kernel refused to transpose")
        return dst

    def router_logits(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T in float32 for x (T, d) in float32 or bfloat16 as it lies (no widened copy) and a float32
        weight (E, d), E <= ROUTER_MAX_EXPERTS, d a multiple of 32; contiguous CPU tensors. The GIL is released."""
        logits = torch.empty(x.shape[0], weight.shape[0])
        if self.router_fn(DROPOUT_DTYPES[x.dtype], x.data_ptr(), weight.data_ptr(), logits.data_ptr(), *x.shape[:1],
                          weight.shape[0], x.shape[1], torch.get_num_threads()):
            raise ValueError(f"skinny kernel refused the router's logits for {tuple(weight.shape)}")
        return logits

    def router_grads(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_x: bool,
                     need_w: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """router_logits' gradients from grad (T, E) float32: (grad @ weight in x's dtype, grad.T @ x in float32),
        each None where not needed."""
        gx = torch.empty_like(x) if need_x else None
        gw = torch.empty_like(weight) if need_w else None
        if self.router_grads_fn(DROPOUT_DTYPES[x.dtype], grad.data_ptr(), x.data_ptr(), weight.data_ptr(),
                                None if gx is None else gx.data_ptr(), None if gw is None else gw.data_ptr(),
                                x.shape[0], weight.shape[0], x.shape[1], torch.get_num_threads()):
            raise ValueError(f"skinny kernel refused the router's gradients for {tuple(weight.shape)}")
        return gx, gw

    def run(self, op: int, dtype: torch.dtype, rows: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray,
            out: int, in_: int, compute: torch.dtype | None = None) -> None:
        """For expert j: op FORWARD c[j] = a[j] @ b[j].T (x, w -> y), INPUT_GRAD c[j] = a[j] @ b[j] (g, w -> gx),
        WEIGHT_GRAD c[j] = a[j].T @ b[j] (g, x -> gw); a, b, c are int64 arrays of the contiguous operands'
        addresses, rows[j] the expert's rows; out and in multiples of 16; dtype the weight's (w, gw), compute the
        activations' (x, y, g, gx; default dtype), a pair in MODES. The GIL is released while it runs."""
        status = self.fn(op, MODES[compute or dtype, dtype], len(rows), rows.ctypes.data, a.ctypes.data,
                         b.ctypes.data, c.ctypes.data, out, in_, torch.get_num_threads())
        if status:
            raise ValueError(f"skinny kernel refused op {op} with out={out}, in={in_}")


def _correct(kernel: Skinny) -> bool:
    """Each op and mode against torch on small cases with three experts (7 rows: a partial block of rows; 3; 40: the
    outer products of the float32 and, on the pair dot product, the bfloat16 forward, the latter's 32 rows and a tail
    of 8 as dot products), with input widths that bfloat16's pair dot products take (96: in the input gradient a chunk
    of two groups of 32 columns, then one of a single group; 128) and one they leave to the conversion path (80), and a
    weight wider out than in (the AMX forward's other blocking); the dropout ops; zeroing; and transposing."""
    shapes = ((32, 80), (32, 96), (32, 128), (64, 32))
    return all(_correct_at(kernel, *mode, out, in_) for mode in MODES for out, in_ in shapes) and \
        all(_dropout_correct(kernel, dtype) for dtype in DROPOUT_DTYPES) and _zero_correct(kernel) and \
        all(_transpose_correct(kernel, dtype) for dtype in (torch.bfloat16, torch.float32)) and \
        all(_router_correct(kernel, dtype) for dtype in DROPOUT_DTYPES)


def _router_correct(kernel: Skinny, dtype: torch.dtype) -> bool:
    """The router's logits and gradients for 5 experts (a partial group of 4) on small integers: exact in any order."""
    x = (torch.arange(7 * 64, dtype=torch.float32).view(7, 64) % 5 - 2).to(dtype)
    w = torch.arange(5 * 64, dtype=torch.float32).view(5, 64) % 3 - 1
    g = torch.arange(7 * 5, dtype=torch.float32).view(7, 5) % 3 - 1
    gx, gw = kernel.router_grads(g, x, w, True, True)
    return torch.equal(kernel.router_logits(x, w), x.float() @ w.T) and torch.equal(gx, (g @ w).to(dtype)) and \
        torch.equal(gw, g.T @ x.float())


def _transpose_correct(kernel: Skinny, dtype: torch.dtype) -> bool:
    """Two matrices of 70 x 45: whole 32 x 32 pieces and partial ones at both edges."""
    src = torch.arange(2 * 70 * 45, dtype=torch.float32).view(2, 70, 45).to(dtype)
    return torch.equal(kernel.transpose(src, torch.empty(2, 45, 70, dtype=dtype)), src.transpose(1, 2))


def _zero_correct(kernel: Skinny) -> bool:
    """Zeroing from an address inside a cache line over a partial line at each end, and nothing outside it."""
    t = torch.full((1000,), 7, dtype=torch.uint8)
    kernel.zero_(t[3:997])
    return bool((t[3:997] == 0).all()) and t[:3].tolist() == [7] * 3 and t[997:].tolist() == [7] * 3


def _dropout_correct(kernel: Skinny, dtype: torch.dtype) -> bool:
    h = (torch.arange(4096, dtype=torch.float32) % 9 - 4).to(dtype)  # small integers: exact in either dtype
    y, g = torch.empty_like(h), torch.empty_like(h)
    kernel.relu_dropout(RELU_DROPOUT, h, None, y, 0.5, seed=1)
    kernel.relu_dropout(RELU_DROPOUT_GRAD, h, y, g, 0.5)
    kept = y != 0
    positive = h > 0
    return (torch.equal(y[kept], 2 * h[kept]) and bool((kept <= positive).all())
            and 0.4 < kept.sum().item() / positive.sum().item() < 0.6 and torch.equal(g, torch.where(kept, 2 * h, 0)))


def _correct_at(kernel: Skinny, compute: torch.dtype, dtype: torch.dtype, out: int, in_: int) -> bool:
    rows = np.array([7, 3, 40], dtype=np.int64)
    n, top = len(rows), int(rows.max())
    w = (torch.arange(n * out * in_, dtype=torch.float32).view(n, out, in_) % 7 - 3).to(dtype)
    x = (torch.arange(n * top * in_, dtype=torch.float32).view(n, top, in_) % 5 - 2).to(compute)
    g = (torch.arange(n * top * out, dtype=torch.float32).view(n, top, out) % 3 - 1).to(compute)
    y, gx, gw = torch.empty(n, top, out, dtype=compute), torch.empty_like(x), torch.empty_like(w)
    ptrs = [np.array([t[e].data_ptr() for e in range(n)], dtype=np.int64) for t in (x, w, y, g, gx, gw)]
    kernel.run(FORWARD, dtype, rows, ptrs[0], ptrs[1], ptrs[2], out, in_, compute)
    kernel.run(INPUT_GRAD, dtype, rows, ptrs[3], ptrs[1], ptrs[4], out, in_, compute)
    kernel.run(WEIGHT_GRAD, dtype, rows, ptrs[3], ptrs[0], ptrs[5], out, in_, compute)
    w, gw = w.to(compute), gw.to(compute)
    # small integers: every dtype computes them exactly
    return all(torch.equal(y[e, :k], x[e, :k] @ w[e].T) and torch.equal(gx[e, :k], g[e, :k] @ w[e])
               and torch.equal(gw[e], g[e, :k].T @ x[e, :k]) for e, k in enumerate(rows))


def probe(variant: str | None = None) -> Skinny | None:
    """The kernels of `variant` (default: the first of candidates() that works) if this machine can build and run
    them and they compute correctly, else None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    for name in [variant] if variant else candidates():
        path = build(name)
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(str(path))
            if not lib.moeify_skinny_supported():
                continue
            kernel = Skinny(lib, name)
            if _correct(kernel):
                return kernel
        except (OSError, AttributeError, ValueError):
            continue
    return None


_LOADED: list = []  # [Skinny or None], probed on first use: import stays cheap


def skinny() -> Skinny | None:
    if not _LOADED:
        _LOADED.append(probe())
    return _LOADED[0]


def loaded() -> Skinny | None:
    """The kernels if an earlier call loaded them, without building or probing."""
    return _LOADED[0] if _LOADED else None
