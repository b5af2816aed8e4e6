"""glibc's malloc, tuned for ONNX Runtime's CPU tensors.

Without its CPU arena (see backends.session_options) ONNX Runtime allocates a call's tensors with malloc
and frees them when the call ends. glibc serves a block of at least M_MMAP_THRESHOLD bytes with its own
mmap and gives it back to the kernel on free; below that it carves the heap. Its threshold starts at
128 KiB but rises to the size of every mmapped block freed, up to 32 MiB, so after a few calls the
graphs' 1-32 MiB tensors (a layer's [tokens, hidden] stream at 1024 tokens is 11 MiB) come from the heap,
where they fragment it: the heap then holds what one call freed while the next maps new blocks beside it.
A fixed threshold of 1 MiB stops the rise (2-core x86-64, glibc 2.36, onnxruntime 1.32, 2026-12-02; see
docs/measurements.md, "Activations").
"""

from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 1 << 20


def map_large_blocks(threshold: int = THRESHOLD) -> bool:
    """Serve every malloc of `threshold` bytes or more with its own mapping, returned on free, for the rest
    of the process. Process-wide; does nothing outside glibc or when MALLOC_MMAP_THRESHOLD_ is set (the
    user's own choice, which glibc already applies). Returns whether the threshold was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    return ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold) == 1
