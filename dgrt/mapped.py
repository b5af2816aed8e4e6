"""Tensors that are views of files: weights a process maps instead of reading, so they sit in the page
cache (shared between processes, dropped under memory pressure, counted as file-backed) instead of in the
process's own memory. The mappings are private (copy-on-write): writing to such a tensor changes the
process's copy, never the file. Files are expected not to change while mapped (dgrt writes its outputs to
a temporary and renames it; a file truncated in place would fault its readers).
"""

from __future__ import annotations

import math
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

# Linux's MAP_NORESERVE (Python 3.11's mmap lacks the name): a private writable mapping is otherwise charged
# in full against the kernel's commit limit, and one larger than RAM (weights.bin of the 26B) is refused.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


class FileMaps:
    """One private memory map per file. A map is never closed: torch.frombuffer keeps it referenced, but
    closing it would unmap the memory under the tensors that view it."""

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
                flags, prot = mmap.MAP_PRIVATE | _MAP_NORESERVE, mmap.PROT_READ | mmap.PROT_WRITE
                view = self._maps[file] = mmap.mmap(f.fileno(), 0, flags=flags, prot=prot)
        return torch.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))
