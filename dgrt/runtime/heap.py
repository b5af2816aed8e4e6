"""glibc's malloc, tuned while ONNX Runtime computes on the CPU.

Without its CPU arena (see backends.session_options) ONNX Runtime allocates a call's tensors with malloc
and frees them when the call ends. glibc serves a block of at least M_MMAP_THRESHOLD bytes with its own
mmap and gives it back to the kernel on free; below that it carves the heap. Its threshold starts at
128 KiB but rises to the size of every mmapped block freed, up to 32 MiB, so after a few calls the
graphs' 1-32 MiB tensors (a layer's [tokens, hidden] stream at 1024 tokens is 11 MiB) come from the heap,
where they fragment it: the heap then holds what one call freed while the next maps new blocks beside it.
A threshold of 1 MiB during ONNX Runtime's calls stops that (a 6-layer real-width prefill 858 -> 758 MiB,
a 2-layer step 599 -> 390, held between calls 195-697 -> 18-22 MiB; 2-core x86-64, glibc 2.36,
onnxruntime 1.32, 2026-12-02; docs/measurements.md, "Activations").

Outside those calls the threshold is 32 MiB, glibc's own ceiling, where a busy process's dynamic threshold
ends up: torch in the same process (a reference model, the torch backend) maps fresh pages for every
tensor of 1 MiB or more at a threshold of 1 MiB, and ran 15-25% slower (the bench preset's generate).
glibc cannot go back to moving the threshold itself once it was set. The runtime's own large temporaries
that live only around a call (on the CPU: the scratch of the KV cache's row moves on append, on every
backend; a prefill chunk's new K/V, on ONNX Runtime's) are also allocated inside large_blocks_mapped: from
the heap they made it grow with the prompt (a 32768-token prefill of the real-width 2-layer slice held 586
MiB beyond the weights and cache instead of 464).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
DURING = 1 << 20
OUTSIDE = 32 << 20

_lock = threading.Lock()
_active = 0  # large_blocks_mapped blocks open in this process


@cache
def _libc() -> ctypes.CDLL | None:
    return ctypes.CDLL(None) if platform.libc_ver()[0] == "glibc" else None


def tunable() -> bool:
    """Whether dgrt sets the threshold: under glibc, unless the user chose one (MALLOC_MMAP_THRESHOLD_)."""
    return "MALLOC_MMAP_THRESHOLD_" not in os.environ and _libc() is not None


def _set_threshold(nbytes: int) -> None:
    """Serve a malloc of `nbytes` or more that the heap's free chunks cannot with its own mapping (returned
    to the kernel on free) instead of growing the heap (glibc refuses more than 32 MiB on 64-bit)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, nbytes)


@contextmanager
def large_blocks_mapped() -> Iterator[None]:
    """Mallocs of DURING bytes or more get their own mappings while any such block is open in the process."""
    global _active
    if not tunable():
        yield
        return
    with _lock:
        _active += 1
        if _active == 1:
            _set_threshold(DURING)
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                _set_threshold(OUTSIDE)
