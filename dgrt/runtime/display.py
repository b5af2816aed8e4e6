"""Showing generation in a terminal: the canvas refining step by step, and a one-line summary."""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from dgrt.runtime.generator import CanvasEvent, Event, GenerationResult, StepEvent
from dgrt.runtime.tokenizer import Tokenizer


class CanvasDisplay:
    """An on_event callback. On a terminal it redraws one line per row after every denoise step (the
    committed text, then the current draft); elsewhere it prints each row once per finished canvas."""

    def __init__(self, tokenizer: Tokenizer | None, rows: int, stream: TextIO | None = None):
        self.tokenizer, self.out = tokenizer, stream or sys.stdout
        self.live = self.out.isatty()
        self.committed = [""] * rows
        self.width = shutil.get_terminal_size().columns
        self._drawn = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, CanvasEvent):
            self.committed = list(event.texts)
        if self.tokenizer is None:
            return
        if isinstance(event, StepEvent):
            if not self.live:
                return
            drafts = [self.tokenizer.decode(row) for row in event.draft.tolist()]
            head = f"[canvas {event.canvas_index + 1}, step {event.step:>3}] "
            lines = [head + text + draft for text, draft in zip(self.committed, drafts, strict=True)]
        else:
            lines = [f"[canvas {event.canvas_index + 1} done] {text}" for text in self.committed]
        lines = [line.replace("\n", "\u23ce")[: self.width - 1] for line in lines]
        if self.live:
            up = f"\033[{self._drawn}F" if self._drawn else ""  # back to the top of what we drew
            self.out.write(up + "".join(f"\033[K{line}\n" for line in lines))
            self._drawn = len(lines)
        else:
            self.out.write("".join(f"{line}\n" for line in lines))
        self.out.flush()


def summary(result: GenerationResult, backend: str) -> str:
    step_ms = 1e3 * sum(result.step_seconds) / max(1, len(result.step_seconds))
    seconds = sum(result.step_seconds) + sum(result.prefill_seconds)
    new = sum(len(row) for row in result.tokens)
    return (
        f"[{backend}] {len(result.step_seconds)} denoise steps of {step_ms:.1f} ms, "
        f"{result.mean_steps_per_canvas:.1f} steps per canvas, tokens per forward "
        f"{', '.join(f'{t:.2f}' for t in result.tokens_per_forward)}, {new / max(seconds, 1e-9):.0f} tokens/s, "
        f"seed {result.seed}"
    )
