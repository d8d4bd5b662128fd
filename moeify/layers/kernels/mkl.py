"""MKL's batched float32 GEMM as torch's CPU build exports it: the GEMMs of experts with different row counts in one
call, which MKL spreads over its threads; probed once, and silently absent where torch has no such MKL."""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import torch

# sgemm_batch_64 is MKL's Fortran interface with 64-bit integers whichever interface layer torch linked (its plain
# cblas_sgemm_batch takes 32- or 64-bit ones depending on that, which a caller cannot tell): column-major, so a
# row-major c = a @ b runs as c.T = b.T @ a.T.
SYMBOL = "sgemm_batch_64"
LIBRARY = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib", "win32": "torch_cpu.dll"}


def _exported():
    """The exported function, or None where this torch's library or the symbol is missing."""
    name = LIBRARY.get(sys.platform)
    try:
        return getattr(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name)), SYMBOL) if name else None
    except (OSError, AttributeError):
        return None


class GemmBatch:
    """Row-major float32 products c = a @ b, or a @ b.T (transpose_b), added one by one, then run in one call (equal
    shapes as one group each), or one torch.mm each when there are fewer than `fewest`."""

    def __init__(self, function, fewest: int = 1) -> None:
        self._function, self._fewest = function, fewest
        self._items: list[tuple[int, ...]] = []
        self._operands: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]] = []  # alive until run()

    def add(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, transpose_b: bool) -> None:
        assert a.dtype == b.dtype == c.dtype == torch.float32 and all(t.stride(-1) == 1 for t in (a, b, c))
        m, n = c.shape
        self._operands.append((a, b, c, transpose_b))
        # (group key: b's transpose, c.T's rows and columns, the sum's length, leading dimensions; then pointers)
        self._items.append((int(transpose_b), n, m, a.shape[1], b.stride(0), a.stride(0), c.stride(0),
                            b.data_ptr(), a.data_ptr(), c.data_ptr()))

    def run(self) -> None:
        if len(self._items) < self._fewest:
            for a, b, c, transpose_b in self._operands:
                torch.mm(a, b.t() if transpose_b else b, out=c)
        elif self._items:
            self._batched()
        self._items, self._operands = [], []

    def _batched(self) -> None:
        items = np.array(sorted(self._items), dtype=np.int64)  # each group's products side by side
        keys, sizes = np.unique(items[:, :7], axis=0, return_counts=True)  # in the same order
        groups = len(keys)
        # In the call's own terms, column-major c.T = b.T @ a.T: its first operand is our b, its second our a.
        transpose_a = np.frombuffer(b"NT", dtype="S1")[keys[:, 0]]
        m, n, k, lda, ldb, ldc = keys[:, 1:7].T
        a, b, c = items[:, 7:10].T
        # The call reads each array by address: all stay referenced here until it returns.
        arrays = [np.ascontiguousarray(v) for v in (
            transpose_a, np.full(groups, b"N", dtype="S1"), m, n, k, np.ones(groups, np.float32), a, lda, b, ldb,
            np.zeros(groups, np.float32), c, ldc, np.array([groups], dtype=np.int64), sizes.astype(np.int64))]
        self._function(*(ctypes.c_void_p(v.ctypes.data) for v in arrays))


def probe():
    """sgemm_batch_64 when this torch exports it and it computes both kinds of product right here, else None."""
    function = _exported()
    if function is None:
        return None
    try:
        a, b = torch.arange(35.).view(7, 5).cos(), torch.arange(20.).view(4, 5).sin()  # no RNG use
        c, d = torch.zeros(7, 4), torch.zeros(3, 5)
        batch = GemmBatch(function)
        batch.add(a, b, c, transpose_b=True)  # two groups of different shapes
        batch.add(a[:3, :4], b, d, transpose_b=False)
        batch.run()
        if torch.allclose(c, a @ b.t(), atol=1e-5) and torch.allclose(d, a[:3, :4] @ b, atol=1e-5):
            return function
    except (OSError, ValueError, RuntimeError):
        pass
    return None


_PROBED: list = []  # [function or None], probed on first use: import stays cheap


def function():
    """probe()'s result, probed once."""
    if not _PROBED:
        _PROBED.append(probe())
    return _PROBED[0]
