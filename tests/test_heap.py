"""glibc's mmap threshold, as the ONNX Runtime backend sets it around its calls: a tensor-sized malloc gets
its own mapping even after a larger block was freed (which, left to glibc, raises the threshold past it),
and between the calls glibc's heap serves it as glibc would. Each check runs in a fresh process: a heap
that already has free chunks serves a malloc from them whatever the threshold."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

CHILD = """
import ctypes
from dgrt.runtime.heap import OUTSIDE, large_blocks_mapped

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2

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
