"""Shared fixtures: tiny checkpoints are generated here, never downloaded."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from dgrt.config import FULL, SLIDING
from dgrt.exporter.onnx_export import ExportOptions, export
from dgrt.presets import preset_config, write_checkpoint, write_tiny

torch.set_num_threads(2)


def variant_config(base: str = "tiny", canvas_length: int | None = None, **text: Any) -> dict[str, Any]:
    """A preset's config.json with some text_config values replaced."""
    cfg = copy.deepcopy(preset_config(base))
    cfg["text_config"].update(text)
    if canvas_length is not None:
        cfg["canvas_length"] = canvas_length
    vocab = cfg["text_config"]["vocab_size"]
    cfg.update(image_token_id=vocab - 1, boi_token_id=vocab - 2, eoi_token_id=vocab - 3)
    return cfg


# Configs beyond the presets, for parity: other layer patterns, windows, head counts, vocab sizes.
VARIANTS = {
    # 5 layers, window 5, 8 heads over 4 (sliding) / 2 (full) KV heads, odd vocab, 6 experts top 3.
    "narrow": variant_config(
        vocab_size=301,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=5,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING, FULL],
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=8,
        global_head_dim=16,
        num_global_key_value_heads=2,
        sliding_window=5,
        num_experts=6,
        top_k_experts=3,
        moe_intermediate_size=24,
        canvas_length=8,
    ),
    # Full layer first, full layers keep the sliding KV head count, another partial rotary factor and
    # softcap, a window wider than the prompt.
    "wide": variant_config(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=3,
        layer_types=[FULL, SLIDING, FULL],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=24,
        num_global_key_value_heads=None,
        sliding_window=20,
        num_experts=3,
        top_k_experts=1,
        moe_intermediate_size=16,
        final_logit_softcapping=15.0,
        canvas_length=12,
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": 500.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 50_000.0},
        },
    ),
}


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny", seed=0)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> dict[str, Path]:
    """The tiny preset and every variant, written once per test session."""
    root = tmp_path_factory.mktemp("variants")
    out = {"tiny": tiny_ckpt}
    for i, (name, cfg) in enumerate(VARIANTS.items()):
        out[name] = write_checkpoint(root / name, cfg, seed=10 + i, tag=name)
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> dict[str, Path]:
    """fp32 exports (with the debug logits output) of the tiny preset and the test variants."""
    root = tmp_path_factory.mktemp("exports")
    for name, ckpt in checkpoints.items():
        export(ckpt, root / name, ExportOptions(debug_logits=True))
    return {name: root / name for name in checkpoints}


@pytest.fixture(scope="session")
def quantized(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> dict[str, Path]:
    """The tiny preset exported with each quantization recipe (INT4 blocks of 32; fp8 with its accuracy)."""
    from dgrt.exporter.quantize import Recipe

    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for recipe in ("fp8", "int4", "int4-experts"):
        options = ExportOptions(
            quant=Recipe(recipe, 32), calibration_samples=4, accuracy="full" if recipe == "fp8" else "off"
        )
        export(tiny_ckpt, root / recipe, options)
        out[recipe] = root / recipe
    return out


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped trained model (string reversal), exported with its logits output."""
    from dgrt.task import shipped_checkpoint

    out = tmp_path_factory.mktemp("trained") / "onnx"
    export(shipped_checkpoint(), out, ExportOptions(debug_logits=True))
    return out


@pytest.fixture(scope="session")
def two_layer_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset cut to one sliding and one full layer: for the half-precision exports, where the
    layer count is not the point (tracing costs seconds per layer)."""
    cfg = variant_config(num_hidden_layers=2, layer_types=[SLIDING, FULL])
    return write_checkpoint(tmp_path_factory.mktemp("two-layer") / "ckpt", cfg, seed=3, tag="two-layer")


@pytest.fixture(scope="session")
def one_layer_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset cut to a single full layer: the cheapest export, for tests of the denoise graph's
    head and of export options (its prefill graph computes only that layer's K/V)."""
    cfg = variant_config(num_hidden_layers=1, layer_types=[FULL])
    return write_checkpoint(tmp_path_factory.mktemp("one-layer") / "ckpt", cfg, seed=4, tag="one-layer")


@pytest.fixture(scope="session")
def fp16_export(tmp_path_factory: pytest.TempPathFactory, two_layer_ckpt: Path) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "export"
    export(two_layer_ckpt, out, ExportOptions(dtype="fp16"))
    return out


@pytest.fixture(scope="session")
def untokenized_export(tmp_path_factory: pytest.TempPathFactory, exports: dict[str, Path]) -> Path:
    """The tiny export as if made from a checkpoint without tokenizer files but trained on dgrt's task (a
    dgrt_task.json): what validate and bench must handle on token ids alone."""
    import json
    import shutil

    from dgrt.exporter.onnx_export import TOKENIZER_FILES
    from dgrt.task import TASK_FILE, Task

    out = tmp_path_factory.mktemp("untokenized") / "tiny"
    shutil.copytree(exports["tiny"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    for name in set(manifest["files"]) & set(TOKENIZER_FILES):
        (out / name).unlink()
    (out / TASK_FILE).write_text(json.dumps(Task().to_json()))
    manifest["files"] = [f for f in manifest["files"] if f not in TOKENIZER_FILES] + [TASK_FILE]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


Cli = Callable[..., CliResult]  # the `cli` fixture: cli("export", ckpt, "-o", out) -> CliResult


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """`dgrt ARGS...` run in this process (dgrt.cli.main, what `python -m dgrt` calls): its exit code and what
    it printed. In-process, a command reuses the graphs this session already traced (tens of seconds each);
    tests/test_cli.py also runs the real executable."""
    from dgrt.cli import main

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()  # only this command's output
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors exit 2, --help 0
            code = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run
