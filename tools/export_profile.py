"""Where the time of `dgrt export` goes: a per-phase table over several runs.

    python tools/export_profile.py [CHECKPOINT] [--runs 3] [--dtype fp32] [--in-process]

Exports CHECKPOINT (default: the shipped trained model) into a temporary folder, N times. Phases are timed
between the exporter's progress messages and around a few of its functions, wrapped here so that the
exporter carries no timing code. Each run is a fresh process by default, like `dgrt export`;
--in-process makes them one after another in this process, like a test session: the first run then also
pays the imports, and later runs reuse its traced graphs ("reuse traced graphs": copying them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

PHASES = {"tracing prefill and denoise": "trace both (two processes)", "tracing prefill": "trace prefill",
          "tracing denoise": "trace denoise", "writing weights": "attach weights", "saving": "save",
          "linting": "lint"}  # fmt: skip
ORDER = ["open, meta model", "reuse traced graphs", "trace both (two processes)", "trace prefill", "trace denoise",
         "fold constants", "name nodes", "attach weights", "save", "manifest", "lint", "other"]  # fmt: skip


def profile_once(checkpoint: Path, dtype: str) -> dict[str, float]:
    """Export once; returns seconds per phase and 'total'."""
    from dgrt.exporter import onnx_export, tracing
    from dgrt.progress import Progress

    marks: list[tuple[str, float]] = []  # (the phase that starts, when)

    def mark(phase: str) -> None:
        marks.append((phase, time.perf_counter()))

    class Recorder(Progress):
        def update(self, message: str, done: int | None = None, total: int | None = None) -> None:
            phase = next((p for prefix, p in PHASES.items() if message.startswith(prefix)), message)
            if phase != marks[-1][0]:
                mark(phase)

        def close(self) -> None:
            mark("other")

    def timed(module: Any, name: str, phase: str, after: str | None) -> Callable[..., Any]:
        """module.<name>, marking `phase` when called and `after` (None: the phase it interrupted) when it
        returns."""
        original = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            before = marks[-1][0]
            mark(phase)
            try:
                return original(*args, **kwargs)
            finally:
                mark(after or before)

        return wrapper

    # (in this process only: the denoise graph's worker process, with two CPUs, is timed as a whole)
    wrappers = {(onnx_export, "traced_graphs"): ("reuse traced graphs", "other"),
                (tracing, "_fold_constants"): ("fold constants", None), (tracing, "_name_nodes"): ("name nodes", None),
                (onnx_export, "_copy_side_files"): ("manifest", "manifest")}  # fmt: skip
    originals = {key: getattr(*key) for key in wrappers}
    try:
        for (module, name), phases in wrappers.items():
            setattr(module, name, timed(module, name, *phases))
        with tempfile.TemporaryDirectory(prefix="dgrt-export-profile-") as tmp:
            mark("open, meta model")
            onnx_export.export(checkpoint, Path(tmp) / "export", onnx_export.ExportOptions(dtype=dtype),
                               progress=Recorder(enabled=False))  # fmt: skip
            end = time.perf_counter()
    finally:
        for (module, name), f in originals.items():
            setattr(module, name, f)
    times: dict[str, float] = defaultdict(float)
    for (phase, t), (_, t_next) in zip(marks, [*marks[1:], ("", end)], strict=True):
        times[phase] += t_next - t
    times["total"] = end - marks[0][1]
    return dict(times)


def main() -> None:
    from dgrt.task import shipped_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path, default=shipped_checkpoint())
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--in-process", action="store_true", help="all runs in this process (like a test session)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child run: JSON on stdout
    args = parser.parse_args()
    if args.one:
        print(json.dumps(profile_once(args.checkpoint, args.dtype)))
        return

    runs = []
    for i in range(args.runs):
        if args.in_process:
            runs.append(profile_once(args.checkpoint, args.dtype))
        else:
            cmd = [sys.executable, __file__, str(args.checkpoint), "--dtype", args.dtype, "--one"]
            runs.append(json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout))
        print(f"run {i + 1}/{args.runs}: {runs[-1]['total']:.1f} s", file=sys.stderr)

    phases = [p for p in ORDER if any(p in r for r in runs)]
    phases += sorted({p for r in runs for p in r} - set(phases) - {"total"}) + ["total"]
    where = "in one process" if args.in_process else "each in a fresh process"
    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at "
          f"the end; {args.checkpoint.name}, {args.dtype}, {args.runs} runs {where}, seconds")  # fmt: skip
    print(f"{'phase':<20}" + "".join(f"{f'run {i + 1}':>8}" for i in range(len(runs))) + f"{'median':>8}")
    for p in phases:
        values = [r.get(p, 0.0) for r in runs]
        print(f"{p:<20}" + "".join(f"{v:>8.2f}" for v in values) + f"{statistics.median(values):>8.2f}")


if __name__ == "__main__":
    main()
