"""Allocation of large expert-gradient buffers backed by transparent huge pages on Linux."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

_HUGE = 2 << 20  # x86-64 and aarch64 transparent huge page size
_MADV_HUGEPAGE = 14
_MIN_BYTES = 4 * _HUGE


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def empty_like_hugepages(t: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(t), hinting the kernel to back a large CPU buffer with huge pages.

    A fresh stacked expert gradient is hundreds of MB. Each backward allocates a new one, and
    first-touch faults on 4 KiB pages cost ~5x the writes themselves (measured: 151 ms vs
    28 ms for 512 MB). The hint changes nothing but speed, and is skipped where unsupported.
    """
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    if _madvise is not None and out.device.type == "cpu" and out.nbytes >= _MIN_BYTES:
        start = -(-out.data_ptr() // _HUGE) * _HUGE
        end = (out.data_ptr() + out.nbytes) // _HUGE * _HUGE
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # a failure only means no speed-up
    return out
