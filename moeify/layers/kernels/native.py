"""The cpu kernel's hand-written GEMMs for few rows per expert (skinny.cpp): built on first use with the system C++
compiler into a per-user cache, loaded with ctypes, and None wherever that cannot be done (no compiler, no
AVX-512, a wrong result on the probe): the cpu kernel then takes torch's paths, silently."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("skinny.cpp")
FLAGS = ("-O3", "-mavx512f", "-mavx512bf16", "-mfma", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
FORWARD, INPUT_GRAD, WEIGHT_GRAD = 0, 1, 2  # y = x @ w.T, gx = g @ w, gw = g.T @ x
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
BUILD_SECONDS = 120


def cache_dir() -> Path:
    """Where built kernels are kept: $MOEIFY_CACHE_DIR, else $XDG_CACHE_HOME/moeify, else ~/.cache/moeify."""
    if os.environ.get("MOEIFY_CACHE_DIR"):
        return Path(os.environ["MOEIFY_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeify"


def build() -> Path | None:
    """The compiled library, built once per source, flags and compiler (the file name holds their digest); None
    when there is no compiler ($CXX, else c++) or it fails. Written to a temporary name, then renamed: two processes
    building at once (torchrun's ranks) each finish with a whole file."""
    compiler = shutil.which(os.environ.get("CXX") or "c++")
    if compiler is None or not SOURCE.is_file():
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, compiler, platform.machine())).encode()).hexdigest()[:16]
    target = cache_dir() / f"skinny-{key}.so"
    if target.is_file():
        return target
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([compiler, *FLAGS, "-o", str(temporary), str(SOURCE)], check=True, capture_output=True,
                       timeout=BUILD_SECONDS)
        os.replace(temporary, target)
    except (OSError, subprocess.SubprocessError):
        temporary.unlink(missing_ok=True)
        return None
    return target


class Skinny:
    """The loaded library: run(op, rows, a, b, c) over a list of experts."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.fn = lib.moeify_skinny
        self.fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
        self.fn.restype = ctypes.c_int

    def run(self, op: int, dtype: torch.dtype, rows: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray,
            out: int, in_: int) -> None:
        """For expert j: op FORWARD c[j] = a[j] @ b[j].T (x, w -> y), INPUT_GRAD c[j] = a[j] @ b[j] (g, w -> gx),
        WEIGHT_GRAD c[j] = a[j].T @ b[j] (g, x -> gw); a, b, c are int64 arrays of the contiguous operands'
        addresses, rows[j] the expert's rows; out and in multiples of 16. The GIL is released while it runs."""
        status = self.fn(op, DTYPES[dtype], len(rows), rows.ctypes.data, a.ctypes.data, b.ctypes.data,
                         c.ctypes.data, out, in_, torch.get_num_threads())
        if status:
            raise ValueError(f"skinny kernel refused op {op} with out={out}, in={in_}")


def _correct(kernel: Skinny) -> bool:
    """Each op and dtype against torch on small cases with two experts (one of 7 rows: a partial block of rows), with
    an input width that bfloat16's pair dot product takes (96) and one it leaves to the conversion path (80)."""
    return all(_correct_at(kernel, dtype, 32, in_) for dtype in DTYPES for in_ in (80, 96))


def _correct_at(kernel: Skinny, dtype: torch.dtype, out: int, in_: int) -> bool:
    w = (torch.arange(2 * out * in_, dtype=torch.float32).view(2, out, in_) % 7 - 3).to(dtype)
    x = (torch.arange(2 * 7 * in_, dtype=torch.float32).view(2, 7, in_) % 5 - 2).to(dtype)
    g = (torch.arange(2 * 7 * out, dtype=torch.float32).view(2, 7, out) % 3 - 1).to(dtype)
    y, gx, gw = torch.empty(2, 7, out, dtype=dtype), torch.empty_like(x), torch.empty_like(w)
    rows = np.array([7, 3], dtype=np.int64)
    ptrs = [np.array([t[0].data_ptr(), t[1].data_ptr()], dtype=np.int64) for t in (x, w, y, g, gx, gw)]
    kernel.run(FORWARD, dtype, rows, ptrs[0], ptrs[1], ptrs[2], out, in_)
    kernel.run(INPUT_GRAD, dtype, rows, ptrs[3], ptrs[1], ptrs[4], out, in_)
    kernel.run(WEIGHT_GRAD, dtype, rows, ptrs[3], ptrs[0], ptrs[5], out, in_)
    # small integers: every dtype computes them exactly
    return all(torch.equal(y[e, :n], x[e, :n] @ w[e].T) and torch.equal(gx[e, :n], g[e, :n] @ w[e])
               and torch.equal(gw[e], g[e, :n].T @ x[e, :n]) for e, n in enumerate(rows))


def probe() -> Skinny | None:
    """The kernels if this machine can build and run them and they compute correctly, else None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    path = build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
        if not lib.moeify_skinny_supported():
            return None
        kernel = Skinny(lib)
        return kernel if _correct(kernel) else None
    except (OSError, AttributeError, ValueError):
        return None


_LOADED: list = []  # [Skinny or None], probed on first use: import stays cheap


def skinny() -> Skinny | None:
    if not _LOADED:
        _LOADED.append(probe())
    return _LOADED[0]
