"""dgrt: export, build and run DiffusionGemma block-diffusion models."""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dgrt.runtime.generator import Generator

__version__ = "0.1.0"


def load(
    path: str | PathLike[str],
    backend: str | None = None,
    threads: int | None = None,
    prepack: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> Generator:
    """Load an export directory or a checkpoint folder for generation; see dgrt.runtime.load.load."""
    from dgrt.runtime.load import load as _load

    return _load(path, backend=backend, threads=threads, prepack=prepack, device=device, dtype=dtype)
