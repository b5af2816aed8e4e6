"""`dgrt bench`: every measurement lands in the JSON, and the plot is a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Cli

from dgrt.bench import interleaved_runs
from dgrt.cli import main

TIMING_KEYS = {"median", "low", "high"}
GENERATION_KEYS = {"tokens_per_second", "seconds", "seconds_low", "seconds_high", "steps_per_canvas"}


def test_bench_json_and_plot(cli: Cli, tmp_path: Path, tiny_ckpt: Path, exports: dict[str, Path]) -> None:
    pytest.importorskip("transformers", reason="--reference needs the reference extra")
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    r = cli("bench", str(exports["tiny"]), "--backend", "onnxruntime,torch", "--reference", str(tiny_ckpt),
              "--runs", "1", "--steps", "2,4", "--prompt-lengths", "4,20", "--past-lengths", "0,30",
              "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert set(report["backends"]) == {"onnxruntime", "torch"}
    for side in (report["backends"]["onnxruntime"], report["backends"]["torch"], report["reference"]):
        assert set(side["prefill_seconds"]) == {"4", "20"}
        assert set(side["denoise_step_seconds"]) == {"0", "30"}
        assert all(set(t) == TIMING_KEYS for t in side["denoise_step_seconds"].values())
        assert set(side["generation"]) == {"K=2", "K=4", "adaptive"}
        assert all(GENERATION_KEYS <= set(g) for g in side["generation"].values())
        assert side["generation"]["K=4"]["steps_per_canvas"] == 4.0
    ort = report["backends"]["onnxruntime"]
    assert 0 < ort["fraction_of_bandwidth"] and report["memory_bandwidth_bytes_per_second"] > 1e8
    assert set(ort["speedup"]) == {"denoise_step", "prefill", "generation"}
    assert report["peak_rss_bytes"] > 0
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "denoise step latency by cached length" in r.stdout


def test_bench_rejects_a_bad_length_list(cli: Cli, exports: dict[str, Path]) -> None:
    r = cli("bench", str(exports["tiny"]), "--past-lengths", "a,b")
    assert r.returncode == 2 and "expected comma-separated integers" in r.stderr and r.stderr.count("\n") == 1


def test_bench_refuses_lengths_beyond_the_context(cli: Cli, exports: dict[str, Path]) -> None:
    r = cli("bench", str(exports["tiny"]), "--past-lengths", "0,4090")  # tiny: context 4096, canvas 16
    assert r.returncode == 2 and "cached lengths at most 4080" in r.stderr and r.stderr.count("\n") == 1


def test_bench_without_a_tokenizer_times_token_ids_and_skips_the_task(
    tmp_path: Path, untokenized_export: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", str(untokenized_export), "--backend", "onnxruntime", "--runs", "1", "--steps", "2",
                 "--prompt-lengths", "4", "--past-lengths", "0", "--json", str(tmp_path / "b.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    note = "no tokenizer: the task metrics were skipped (they score text answers)"
    assert f"note: {note}" in out
    report = json.loads((tmp_path / "b.json").read_text())
    side = report["backends"]["onnxruntime"]
    assert set(side["generation"]) == {"K=2", "adaptive"} and side["generation"]["K=2"]["steps_per_canvas"] == 2.0
    assert "task" not in side and report["notes"] == [note]
    assert "gpu_memory_bytes" not in report  # no backend fills it on a CPU


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "0"], "--runs is 0; expected an integer of at least 1."),
        (["--runs", "-1"], "--runs is -1; expected an integer of at least 1."),
        (["--threads", "0"], "--threads is 0; expected an integer of at least 1."),
        (["--threads", "-1"], "--threads is -1; expected an integer of at least 1."),
        (["--steps", "8,0"], "--steps has 0; expected integers of at least 1."),
        (["--prompt-lengths", "0,16"], "--prompt-lengths has 0; expected integers of at least 1."),
        (["--past-lengths", "-1"], "--past-lengths has -1; expected integers of at least 0."),
    ],
)
def test_bench_refuses_numbers_out_of_range_in_one_line(
    exports: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["bench", str(exports["tiny"]), *args]) == 2
    err = capsys.readouterr().err
    assert err == f"dgrt: error: {message}\n"


def test_interleaved_runs_take_the_sides_in_turn_after_a_warm_up_each() -> None:
    calls: list[str] = []
    times = interleaved_runs({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=2)
    assert calls == ["a", "b"] * 3
    assert [len(t) for t in times.values()] == [2, 2] and all(x >= 0 for t in times.values() for x in t)
