"""The `dgrt` command line as a user runs it: the executable itself for exit codes and stderr, the rest in
this process (the `cli` fixture) where a command can reuse the session's traced graphs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cli


def dgrt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dgrt", *args], capture_output=True, text=True, timeout=300)


def test_demo_answers_a_question_with_the_trained_model(cli: Cli, trained_export: Path) -> None:
    """trained_export is built first so that the demo's export reuses its traced graphs (one trace of the
    trained model for the whole session, not one here and another when later tests need the fixture)."""
    r = cli("demo")
    assert r.returncode == 0, r.stderr
    assert "exported dgrt's trained string-reversal checkpoint to ONNX" in r.stdout
    assert re.search(r"TensorRT lint of \d+ nodes: passed", r.stdout)
    assert "accuracy against transformers: passed" in r.stdout
    assert "[canvas 2 done]" in r.stdout and "denoise steps of" in r.stdout and "tokens/s" in r.stdout
    assert "answer correct" in r.stdout and "task accuracy" in r.stdout


def test_tiny_then_inspect(cli: Cli, tmp_path: Path) -> None:
    r = cli("tiny", str(tmp_path / "ck"), "--preset", "tiny", "--seed", "7")
    assert r.returncode == 0, r.stderr
    r = cli("inspect", str(tmp_path / "ck"))
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


def test_generate_json_has_ids_text_and_statistics(cli: Cli, exports: dict[str, Path]) -> None:
    import json

    r = cli(
        "generate",
        str(exports["tiny"]),
        "Hello",
        "Bye",
        "--steps",
        "3",
        "--max-new-tokens",
        "32",
        "--seed",
        "4",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) == 2 and len(out["texts"]) == 2
    assert out["steps_per_canvas"][0][0] <= 3 and out["seed"] == 4 and out["backend"] == "onnxruntime"
    assert out["mean_step_seconds"] > 0 and len(out["prefill_seconds"]) >= 1


def test_generate_stream_prints_each_canvas(cli: Cli, exports: dict[str, Path]) -> None:
    r = cli(
        "generate",
        str(exports["tiny"]),
        "Hello",
        "--steps",
        "2",
        "--max-new-tokens",
        "32",
        "--stream",
        "--no-adaptive",
        "--eos-id",
    )
    assert r.returncode == 0, r.stderr
    assert "[canvas 1 done]" in r.stdout and "[canvas 2 done]" in r.stdout
    assert "denoise steps" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "/nonexistent", "hi"], "neither an export directory"),
        (["generate", "{export}", "hi", "--steps", "0"], "steps is 0"),
        (["generate", "{export}", ""], "the prompt is empty"),
    ],
)
def test_generate_bad_input(cli: Cli, exports: dict[str, Path], args: list[str], message: str) -> None:
    r = cli(*[a.format(export=exports["tiny"]) for a in args])
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "/nonexistent"], "neither an export directory"),
        (["serve", "{export}", "--max-batch", "0"], "--max-batch is 0"),
        (["serve", "{export}", "--port", "70000"], "--port is 70000"),
    ],
)
def test_serve_bad_input(cli: Cli, exports: dict[str, Path], args: list[str], message: str) -> None:
    r = cli(*[a.format(export=exports["tiny"]) for a in args])
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_quantized_export_from_the_command_line(cli: Cli, tiny_ckpt: Path, tmp_path: Path) -> None:
    r = cli("export", str(tiny_ckpt), "-o", str(tmp_path / "q"), "--quant", "int4", "--block-size", "32",
             "--no-accuracy")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "lint passed" in r.stdout and "accuracy of" not in r.stdout
    r = cli("export", str(tiny_ckpt), "-o", str(tmp_path / "q2"), "--quant", "int4")  # default block 64
    assert r.returncode == 2 and "choose a --block-size that divides it" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "q2").exists()
