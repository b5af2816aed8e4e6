"""Writing outputs so that a crash never leaves a half-written result that looks valid."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dgrt.errors import DgrtError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(out_dir: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` by a rename.

    An existing non-empty `out_dir` is refused unless `force`. On any error the temporary folder is
    removed and `out_dir` is left as it was.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DgrtError(f"{out_dir}: exists and is not a directory.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise DgrtError(f"{out_dir}: already exists and is not empty (pass --force to replace it).")
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    except OSError as e:
        raise DgrtError(f"{out_dir}: cannot write here ({e.strerror}).") from None
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DgrtError(f"{path}: cannot write here ({e.strerror}).") from None
