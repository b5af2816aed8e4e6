"""The `dgrt` command line as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def dgrt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dgrt", *args], capture_output=True, text=True, timeout=300)


def test_demo_runs_prefill_and_a_denoise_step() -> None:
    r = dgrt("demo", "--preset", "tiny", "--repeats", "2")
    assert r.returncode == 0, r.stderr
    assert "logits [1, 16, 256]" in r.stdout
    assert "denoise step" in r.stdout and "ms" in r.stdout


def test_tiny_then_inspect(tmp_path: Path) -> None:
    r = dgrt("tiny", str(tmp_path / "ck"), "--preset", "tiny", "--seed", "7")
    assert r.returncode == 0, r.stderr
    r = dgrt("inspect", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    assert "4 (SFSF)" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "/nonexistent/ckpt"], "not a checkpoint folder"),
        (["tiny", "/proc/dgrt-cannot-write/x"], "cannot write here"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args: list[str], message: str) -> None:
    r = dgrt(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("dgrt: error: ")
