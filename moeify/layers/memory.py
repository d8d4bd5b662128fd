"""Large CPU buffers (expert gradients, activations): huge-page backed and recycled on Linux."""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
import sys
import threading
import warnings
import weakref

import torch

_HUGE = 2 << 20  # x86-64 and aarch64 transparent huge page size
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_MIN_BYTES = 2 * _HUGE  # below this glibc recycles memory well enough


def _default_cache_limit() -> int:
    """MOEIFY_BUFFER_CACHE_BYTES, else a quarter of physical memory (at least 2 GiB). A training step frees and takes
    the same buffers every step: a cache smaller than that working set unmaps some at every step's end, and the next
    step faults them in again. 2 GiB was that limit until 2026-12-04: 256 experts' float32 gradients at t5-small's
    width are 2 GiB alone, and the backward of that layer at 8,192 tokens took 570-2,400 ms against 370-430 with the
    whole set kept (docs/performance.md)."""
    setting = os.environ.get("MOEIFY_BUFFER_CACHE_BYTES")
    if setting is not None:
        try:
            return max(0, int(setting))
        except ValueError:
            warnings.warn(f"MOEIFY_BUFFER_CACHE_BYTES={setting!r} is not a number of bytes; using the default",
                          stacklevel=2)
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX
        physical = 0
    return max(2 << 30, physical // 4)


# Freed buffers kept for reuse, at most this many bytes in all (0 disables the cache).
cache_limit_bytes = _default_cache_limit()


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


def _whole(ptr: int, nbytes: int, unit: int) -> tuple[int, int]:
    """(start, end) of the whole `unit`-sized pages inside [ptr, ptr + nbytes); start >= end when there are none."""
    return -(-ptr // unit) * unit, (ptr + nbytes) // unit * unit


def _advise_huge(ptr: int, nbytes: int) -> None:
    start, end = _whole(ptr, nbytes, _HUGE)
    if end > start:
        _madvise(start, end - start, _MADV_HUGEPAGE)  # a failure only means no speed-up


class _Block:
    """One anonymous private mapping of `nbytes`, 2 MiB aligned so that each huge page is whole."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        # Private: Python's default for anonymous maps is MAP_SHARED, which is shmem, where
        # MADV_DONTNEED does not zero and huge pages follow a different setting.
        self.map = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.offset = -base % _HUGE
        _advise_huge(base + self.offset, nbytes)


_free: list[_Block] = []  # blocks whose tensors have died, oldest first
_live: dict[int, _Block] = {}  # data address -> block, for blocks handed out
_cached = [0]  # bytes held in _free; a list so the finalizer can update it without `global`
_lock = threading.RLock()  # tensors may die on any thread, even inside _take (cyclic GC)


def _give_back(ptr: int, block: _Block) -> None:  # runs when the last view of a buffer dies
    with _lock:
        _live.pop(ptr, None)
        _free.append(block)
        _cached[0] += block.nbytes
        while _cached[0] > cache_limit_bytes and _free:
            _cached[0] -= _free.pop(0).nbytes  # dropping the last reference unmaps it


def empty_cache() -> None:
    """Return every cached buffer to the operating system, and the native kernels' operand buffers where they run
    (86 MiB for t5-small's FFN at 128 experts of 64 rows in float32: the weight gradients' operands laid out)."""
    with _lock:
        _free.clear()
        _cached[0] = 0
    from moeify.layers.kernels import native  # here: the kernels import this module
    if native.loaded() is not None:
        native.loaded().release()


def _take(nbytes: int) -> tuple[_Block, bool]:
    # The most recently freed block that fits without wasting over a quarter: its pages are warm.
    with _lock:
        for i in range(len(_free) - 1, -1, -1):
            if nbytes <= _free[i].nbytes <= nbytes + nbytes // 4 + _HUGE:
                block = _free.pop(i)
                _cached[0] -= block.nbytes
                return block, False
    return _Block(-(-nbytes // _HUGE) * _HUGE), True


def pools(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `empty` takes a tensor of this shape, dtype and device from the recycled mappings (else torch.empty)."""
    # The size first: most asks are small, and a layer's Python runs between GEMMs with cold caches.
    if _madvise is None or math.prod(shape) * dtype.itemsize < max(_MIN_BYTES, 1):
        return False
    return (device if isinstance(device, torch.device) else torch.device(device)).type == "cpu"


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
          pool: bool = True) -> tuple[torch.Tensor, bool]:
    """(tensor, is_zero): an uninitialised contiguous tensor, and whether it reads as all zeros.

    Large CPU buffers come from huge-page backed anonymous mappings that are recycled when the
    tensor dies. glibc hands each big tensor a fresh mapping and unmaps it on free, so every
    step pays first-touch page faults again (~30 ms per 512 MB even with huge pages), while the
    per-expert 4 MB tensors of an nn.ModuleList of experts are recycled by malloc for free.
    A fresh mapping reads as zeros, so callers can skip writing zeros. Release parts that must
    read as zero with `zero_pages_`, which only works on these buffers.
    """
    numel = math.prod(shape)
    if not pool or not pools(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device), False
    block, is_zero = _take(numel * dtype.itemsize)
    view = memoryview(block.map)
    flat = torch.frombuffer(view, dtype=dtype, count=numel, offset=block.offset)
    # A tensor of its own on that storage rather than flat.view(shape): a view may not be modified in place
    # once it leaves a custom autograd Function (the activation runs in place on the kernel's output).
    out = torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), flat.storage_offset(), shape)
    with _lock:
        _live[out.data_ptr()] = block
    # The tensor's storage holds `view` until it dies; then the block goes back to the cache.
    weakref.finalize(view, _give_back, out.data_ptr(), block).atexit = False
    return out, is_zero


def gradient_buffer(like: torch.Tensor, pool: bool = True) -> tuple[torch.Tensor, bool]:
    """`empty` shaped like `like`: (buffer, is_zero)."""
    return empty(tuple(like.shape), like.dtype, like.device, pool)


def zero_pages_(t: torch.Tensor) -> None:
    """t.zero_() for a contiguous tensor, cheaper on a slice of an `empty` buffer.

    There whole pages go back to the kernel (MADV_DONTNEED), which maps zero pages on the next
    touch: nothing now, but a page written again later is zeroed by the kernel then, which in a
    training step cost more than writing zeros where most experts have rows (the cpu kernel weighs
    the two: ZERO_BY_WRITING_MIN_COVERED).
    That is only valid on private anonymous memory, hence only on our own mappings.
    """
    if not t.numel():
        return
    assert t.is_contiguous()
    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    start, end = _whole(ptr, nbytes, _PAGE)
    if t.device.type != "cpu" or t.untyped_storage().data_ptr() not in _live or end - start < _HUGE or \
            _madvise(start, end - start, _MADV_DONTNEED) != 0:
        t.zero_()
        return
    flat = t.view(-1)
    size = t.element_size()
    flat[: (start - ptr) // size].zero_()  # partial pages at both ends
    flat[(end - ptr) // size:].zero_()
