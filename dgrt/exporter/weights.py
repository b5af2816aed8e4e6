"""One weights file shared by both graphs, written one tensor at a time."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import torch

# Offsets of large tensors are aligned so ONNX Runtime can memory-map them (4 KiB pages on Linux, 64 KiB
# allocation granularity on Windows); small ones only to 64 bytes, to keep the file compact.
LARGE_ALIGNMENT = 65536
SMALL_ALIGNMENT = 64
LARGE_TENSOR_BYTES = 1 << 20
CONVERT_CHUNK = 1 << 24  # values converted to the export dtype at once (see WeightFile.add)


class WeightFile:
    """Appends raw little-endian tensor bytes; returns where each tensor landed; hashes as it goes."""

    def __init__(self, path: Path):
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._sha = hashlib.sha256()
        self.size = 0
        self.count = 0

    def add(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[int, int]:
        """Write a tensor, converted to `dtype` if given; returns (offset, length) in bytes. The conversion
        goes CONVERT_CHUNK values at a time: the real model's embedding is 1.5 GB in bf16 and 3 GB in
        fp32, and converted whole, both were held at once."""
        dtype = dtype or tensor.dtype
        nbytes = tensor.numel() * dtype.itemsize
        offset = aligned(self.size, nbytes)
        self._write(bytes(offset - self.size))
        flat = tensor.detach().cpu().reshape(-1)
        for start in range(0, flat.numel(), CONVERT_CHUNK):
            part = flat[start : start + CONVERT_CHUNK].to(dtype).contiguous()
            self._write(part.view(torch.uint8).numpy().data)
        self.count += 1
        return offset, nbytes

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data) if isinstance(data, bytes) else data.nbytes

    def close(self) -> str:
        """Close the file; returns its sha256 as 'sha256:<hex>'."""
        self._file.close()
        return "sha256:" + self._sha.hexdigest()


def aligned(offset: int, nbytes: int) -> int:
    """Where a tensor of `nbytes` written after `offset` bytes of the file starts."""
    alignment = LARGE_ALIGNMENT if nbytes >= LARGE_TENSOR_BYTES else SMALL_ALIGNMENT
    return offset + -offset % alignment


def file_size(tensor_bytes: Iterable[int]) -> int:
    """The size of a weights file holding tensors of these sizes, written in this order."""
    size = 0
    for nbytes in tensor_bytes:
        size = aligned(size, nbytes) + nbytes
    return size
