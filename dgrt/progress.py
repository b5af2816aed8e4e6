"""Progress for long steps: a live line on a terminal, nothing otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._t0 = time.perf_counter()
        self._last = 0.0

    def update(self, message: str, done: int | None = None, total: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if done is not None and total and done < total and now - self._last < 0.1:
            return  # redraw at most ten times a second
        self._last = now
        bar = ""
        if done is not None and total:
            filled = int(24 * done / total)
            bar = f" [{'#' * filled}{'.' * (24 - filled)}] {done}/{total}"
        self.stream.write(f"\r\033[K{message}{bar} ({now - self._t0:.0f} s)")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
