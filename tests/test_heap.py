"""glibc's mmap threshold, as the ONNX Runtime backend sets it around its calls: a tensor-sized malloc gets
its own mapping even after a larger block was freed (which, left to glibc, raises the threshold past it),
and between the calls glibc's heap serves it as glibc would, except for the runtime's own temporaries
that come and go with a call. Each check runs in a fresh process: a heap that already has free chunks
serves a malloc from them whatever the threshold."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

_libc, _version = platform.libc_ver()
pytestmark = pytest.mark.skipif(
    _libc != "glibc" or tuple(map(int, _version.split(".")[:2])) < (2, 33),
    reason="glibc's malloc, 2.33 or later (mallinfo2)",
)

MALLINFO = """
import ctypes

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
"""

CHILD = MALLINFO + """
from dgrt.runtime.heap import OUTSIDE, large_blocks_mapped

def mapped_by_malloc(size):  # whether glibc serves a malloc of `size` bytes with its own mapping
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd - before >= size
    libc.free(block)
    return mapped

libc.free(libc.malloc(16 << 20))  # glibc alone now serves blocks up to 16 MiB from its heap
seen = []
with large_blocks_mapped():
    seen.append(mapped_by_malloc(2 << 20))
    with large_blocks_mapped():  # a call in another thread
        pass
    seen.append(mapped_by_malloc(2 << 20))
seen += [mapped_by_malloc(2 << 20), mapped_by_malloc(OUTSIDE)]
print(" ".join(map(str, seen)))
"""


def mapped(env: dict[str, str]) -> list[bool]:
    """Whether a 2 MiB malloc was mapped: during a call (twice), after it; and a 32 MiB one after."""
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True).stdout
    return [word == "True" for word in out.split()]


def test_tensor_sized_blocks_are_mapped_during_onnx_runtime_calls_only() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    assert mapped(env) == [True, True, False, True]


def test_the_users_own_threshold_is_left_alone() -> None:
    assert mapped(os.environ | {"MALLOC_MMAP_THRESHOLD_": "33554432"}) == [False, False, False, True]


def test_a_long_prompt_appended_chunk_by_chunk_leaves_the_heap_as_it_was() -> None:
    """Appending a chunk moves each full layer's rows in place, through a temporary as large as a row (up to
    32 MiB here) where a row overlaps its new place. Given its own mapping, it leaves nothing behind; from
    the heap, the heap would keep growing with the prompt (the real-width slice's 32768-token prefill held
    1.33x its estimate, 1.06x with these mapped)."""
    child = MALLINFO + """
import torch
from dgrt.runtime.heap import large_blocks_mapped
from dgrt.runtime.kv_cache import KVCache, LayerShape

libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: the heap never shrinks, so its size is its high-water mark
with large_blocks_mapped():  # an ONNX Runtime call: glibc's threshold is 32 MiB after it
    pass
cache = KVCache([LayerShape(2, 1024, None)], 1, 8192, torch.float32)  # 2 rows of up to 32 MiB
chunk = [(torch.ones(1, 2, 512, 1024), torch.ones(1, 2, 512, 1024))]
before = libc.mallinfo2().arena
for _ in range(16):
    cache.append(chunk)
print(libc.mallinfo2().arena - before)
"""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True).stdout
    grown = int(out)
    assert grown < 4 << 20, f"the heap grew by {grown / 2**20:.1f} MiB"
