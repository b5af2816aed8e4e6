"""glibc's mmap threshold, as the ONNX Runtime backend sets it around its calls: a tensor-sized malloc gets
its own mapping even after a larger block was freed (which, left to glibc, raises the threshold past it),
and between the calls glibc's heap serves it as glibc would."""

from __future__ import annotations

import ctypes
import platform

import pytest

from dgrt.runtime.heap import OUTSIDE, large_blocks_mapped

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


def test_tensor_sized_blocks_are_mapped_during_onnx_runtime_calls_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    libc.free(libc.malloc(16 << 20))  # glibc alone now serves blocks up to 16 MiB from its heap
    with large_blocks_mapped():
        assert mapped_by_malloc(2 << 20)
        with large_blocks_mapped():  # calls in other threads
            pass
        assert mapped_by_malloc(2 << 20)
    assert not mapped_by_malloc(2 << 20)  # torch's tensors between the calls come from the heap again
    assert mapped_by_malloc(OUTSIDE)


def test_the_users_own_threshold_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    libc.free(libc.malloc(16 << 20))
    with large_blocks_mapped():
        assert not mapped_by_malloc(2 << 20)
