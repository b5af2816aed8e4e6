"""`dgrt validate`: an export against the transformers reference, with bounds per precision."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("transformers", reason="the reference extra (transformers==5.23.0) is needed")

REPORT_KEYS = {"export", "reference", "backend", "dtype", "same_checkpoint", "checks", "details", "ok"}
CHECK_KEYS = {"name", "measured", "bound", "higher_is_better", "ok"}


def validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dgrt", "validate", *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_fp32_export_passes_and_writes_the_json_report(
    tmp_path: Path, tiny_ckpt: Path, exports: dict[str, Path]
) -> None:
    r = validate(
        str(exports["tiny"]), "--reference", str(tiny_ckpt), "--steps", "6", "--json", str(tmp_path / "v.json")
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation passed" in r.stdout
    report = json.loads((tmp_path / "v.json").read_text())
    assert set(report) == REPORT_KEYS and report["ok"] and report["same_checkpoint"]
    assert all(set(c) == CHECK_KEYS for c in report["checks"])
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["denoise logits max abs error"]["measured"] < 1e-4 and checks["denoise logits max abs error"]["ok"]
    assert checks["denoise logits error, 99th pct over positions"]["bound"] == 1e-3
    assert checks["end to end token agreement (shared noise)"]["measured"] == 1.0
    assert report["details"]["denoise_positions_compared"] == 3 * 2 * 6 * 16  # prompts x canvases x steps x C


def test_a_perturbed_weight_fails_validation(tmp_path: Path, tiny_ckpt: Path, exports: dict[str, Path]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(exports["tiny"], broken)
    norm = ir.load(broken / "denoise.onnx").graph.initializers["model.layers.2.post_attention_layernorm.weight"]
    weights = np.memmap(broken / "weights.bin", dtype=np.uint8, mode="r+")
    weights[norm.const_value.offset : norm.const_value.offset + 4].view(np.float32)[0] += 0.5  # one weight
    weights.flush()
    r = validate(str(broken), "--reference", str(tiny_ckpt), "--steps", "4")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "validation FAILED" in r.stdout
    assert r.stdout.split("denoise logits error, 99th pct over positions")[1].splitlines()[0].endswith("FAIL")


def test_fp16_bounds_come_from_the_precisions_own_error(tmp_path: Path, tiny_ckpt: Path) -> None:
    from dgrt.exporter.onnx_export import ExportOptions, export
    from dgrt.validate import validate as run

    export(tiny_ckpt, tmp_path / "fp16", ExportOptions(dtype="fp16"))
    report = run(tmp_path / "fp16", tiny_ckpt, steps=4, canvases=1)
    assert report.ok, report.format()
    baseline = report.details["baseline"]
    checks = {c.name: c for c in report.checks}
    assert checks["denoise logits mean abs error"].bound == pytest.approx(2 * baseline["logits_mean_abs_error"] + 1e-4)
    assert checks["end to end token agreement (shared noise)"].bound is None
