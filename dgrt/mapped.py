"""Tensors that are views of files: weights a process maps instead of reading, so they sit in the page
cache (shared between processes, dropped under memory pressure, counted as file-backed) instead of in the
process's own memory. The mappings are private (copy-on-write): writing to such a tensor changes the
process's copy, never the file.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from pathlib import Path

import torch


class FileMaps:
    """One private memory map per file, kept for as long as any tensor views it."""

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def tensor(self, file: Path, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor | None:
        """A view of `shape` elements of `dtype` at byte `offset` of `file`; None where there can be no
        view (no elements, or an offset that is not a multiple of the element size)."""
        count = math.prod(shape)
        if count == 0 or offset % dtype.itemsize:
            return None
        view = self._maps.get(file)
        if view is None:
            with open(file, "rb") as f:
                view = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return torch.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))
