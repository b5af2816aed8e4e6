"""`dgrt plan`: its predictions against what `dgrt export` writes and what the runtime allocates, and its
answer for the real 26B-A4B model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Cli

import dgrt
from dgrt.contract.experts import DENSE
from dgrt.exporter.onnx_export import ExportOptions, export
from dgrt.plan import hardware, make_plan
from dgrt.tensorrt.targets import TARGETS


def test_weights_bin_is_predicted_to_the_byte(
    tmp_path: Path,
    exports: dict[str, Path],
    quantized: dict[str, Path],
    fp16_export: Path,
    two_layer_ckpt: Path,
    one_layer_ckpt: Path,
) -> None:
    # bf16 with the dense MoE: what the command-line test exports (its trace is reused when it ran first)
    export(one_layer_ckpt, tmp_path / "bf16", ExportOptions(dtype="bf16", experts=DENSE))
    written = [*exports.values(), *quantized.values(), fp16_export, tmp_path / "bf16"]
    for path in written:  # each export is planned with its own dtype and recipe
        assert make_plan(str(path), target="h200").sizes.weights == (path / "weights.bin").stat().st_size, path
    # and from the checkpoint, a recipe asked for
    planned = make_plan(str(two_layer_ckpt), dtype="fp16", target="h200").sizes.weights
    assert planned == (fp16_export / "weights.bin").stat().st_size


@pytest.mark.parametrize("rows", [1, 2])
def test_the_kv_cache_is_what_generate_allocates(exports: dict[str, Path], rows: int) -> None:
    prompt, max_new = 12, 40  # the tiny preset's canvas is 16: 3 canvases, a context of 12 + 48
    with dgrt.load(exports["tiny"]) as gen:
        gen.generate([[7] * prompt] * rows, max_new_tokens=max_new, steps=2, seed=0)
        allocated = gen.kv_cache_bytes
    plan = make_plan(str(exports["tiny"]), batch=rows, prompt=prompt, target="h100")
    assert plan.context == prompt + 48  # max_new_tokens in whole canvases (the export has generation_config's)
    assert allocated > 0 and make_plan(str(exports["tiny"]), batch=rows, prompt=12, context=60).sizes.kv == allocated


def test_the_real_model_on_every_target(cli: Cli, tmp_path: Path) -> None:
    r = cli("plan", "gemma4-26b-a4b", "--dtype", "bf16", "--context", "8192", "--json", tmp_path / "plan.json")
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [f["target"] for f in plan["fits"]] == list(TARGETS)
    assert all(f"\n{name} " in r.stdout for name in TARGETS)
    # 25.2B text parameters in bf16 (the vision tower is not exported), the embedding stored once
    assert 25.0e9 < plan["sizes"]["weights"] / 2 < 25.5e9
    # KV, K and V in bf16: 5 full layers of 2 x 512 per token; 25 sliding ones of 8 x 256 hold 1023 tokens
    assert plan["sizes"]["kv_per_token"] == 5 * 2 * 512 * 2 * 2
    assert plan["sizes"]["kv_sliding"] == 25 * 8 * 256 * 1023 * 2 * 2
    assert plan["sizes"]["kv"] == plan["sizes"]["kv_sliding"] + 8192 * plan["sizes"]["kv_per_token"]
    fits = {f["target"]: f for f in plan["fits"]}
    assert fits["h200"]["one_engine_bytes"] < fits["h200"]["usable_bytes"] < fits["l40s"]["one_engine_bytes"] * 3
    assert "--quant fp8" in plan["changes"]["l40s"]  # 50 GB of bf16 weights do not fit in 46 usable GB
    # a denoise step reads every weight: the floor is at least the weights over the bandwidth
    assert fits["h200"]["step_floor_s"] >= plan["sizes"]["weights"] / 4800e9


def test_every_target_has_figures_with_sources() -> None:
    for name, hw in hardware().items():
        assert hw.memory_gb > 0 and hw.bandwidth_gbs > 0 and hw.tflops["bf16"] > 0 and hw.sources, name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "/nonexistent"], "neither an export, a checkpoint folder nor a shipped config"),
        (["plan", "gemma4-26b-a4b", "--target", "v100"], "unknown target 'v100'"),
        (["plan", "gemma4-26b-a4b", "--context", "100"], "--context is 100"),
        (["plan", "gemma4-26b-a4b", "--steps", "0"], "--steps is 0"),
    ],
)
def test_bad_input_is_one_sentence(cli: Cli, args: list[str], message: str) -> None:
    r = cli(*args)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
