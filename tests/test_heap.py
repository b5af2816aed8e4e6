"""glibc's mmap threshold, as the ONNX Runtime backend sets it: a tensor-sized malloc gets its own mapping
even after a larger block was freed (which, left to glibc, raises the threshold past it)."""

from __future__ import annotations

import ctypes
import platform

import pytest

from dgrt.runtime.heap import map_large_blocks

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]


libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2


def mapped_by_malloc(size: int) -> bool:
    """Whether glibc serves a malloc of `size` bytes with its own mapping."""
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblkhd - before >= size
    libc.free(block)
    return mapped


def test_a_tensor_sized_block_is_mapped_after_a_larger_one_was_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert map_large_blocks()
    libc.free(libc.malloc(16 << 20))  # glibc alone would now serve blocks up to 16 MiB from its heap
    assert mapped_by_malloc(2 << 20)


def test_the_users_own_threshold_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert not map_large_blocks()
