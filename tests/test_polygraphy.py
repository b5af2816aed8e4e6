"""`polygraphy run` on an export's graphs with the data loader every export carries (Polygraphy's ONNX
Runtime runner; its TensorRT runner takes the same loader where TensorRT exists)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgrt.contract.manifest import load
from dgrt.interop.polygraphy import DATA_LOADER, recorded

pytest.importorskip("polygraphy", reason="Polygraphy is a dev dependency")


@pytest.mark.parametrize("graph", ["prefill", "denoise"])
def test_polygraphy_runs_each_graph_on_the_recorded_feeds(exports: dict[str, Path], tmp_path: Path, graph: str) -> None:
    export = exports["tiny"]
    assert (export / DATA_LOADER).exists()
    saved = tmp_path / "outputs.json"
    run = subprocess.run(
        [
            str(Path(sys.executable).parent / "polygraphy"), "run", f"{graph}.onnx", "--onnxrt",
            "--data-loader-script", f"{DATA_LOADER}:load_{graph}", "--save-outputs", str(saved),
        ],  # fmt: skip
        cwd=export,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "PASSED" in run.stdout

    from polygraphy.comparator import RunResults

    [(_, iterations)] = RunResults.load(str(saved)).items()
    expected = recorded(export).outputs[graph]  # what the runtime's own generation got from each call
    assert len(iterations) == len(expected) == {"prefill": 2, "denoise": 6}[graph]
    for got, want in zip(iterations, expected, strict=True):
        assert set(want) <= set(got)  # the runtime leaves the debug logits unbound
        for name, tensor in want.items():
            torch.testing.assert_close(torch.as_tensor(got[name]), tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_recorded_feeds_are_what_the_runtime_sends(exports: dict[str, Path]) -> None:
    """Two canvases: a prefill from an empty cache, then one extending it; denoise steps at both lengths."""
    feeds = recorded(exports["tiny"]).feeds
    full = f"past_key_values.{load(exports['tiny']).config.num_layers - 1}.key"  # the last layer attends to all
    past = [f[full].shape[2] for f in feeds["prefill"]]
    assert past[0] == 0 and past[1] == feeds["prefill"][0]["input_ids"].shape[1]
    steps = feeds["denoise"]
    assert {f[full].shape[2] for f in steps} == {past[1], past[1] + 16}
    assert not steps[0]["soft_embeds"].any() and steps[1]["soft_embeds"].any()  # self-conditioning after step 1
    assert "expert_slots" in steps[0]  # a routed export
