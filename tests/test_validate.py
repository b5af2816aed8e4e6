"""`dgrt validate`: an export against the transformers reference, with bounds per precision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from conftest import Cli

from dgrt.cli import build_parser, main
from dgrt.contract.manifest import file_sha256

pytest.importorskip("transformers", reason="the reference extra (transformers==5.23.0) is needed")

REPORT_KEYS = {"export", "reference", "backend", "dtype", "same_checkpoint", "checks", "details", "notes", "ok"}
CHECK_KEYS = {"name", "measured", "bound", "higher_is_better", "ok"}


def test_fp32_export_passes_and_writes_the_json_report(
    cli: Cli, tmp_path: Path, tiny_ckpt: Path, exports: dict[str, Path]
) -> None:
    r = cli(
        "validate",
        str(exports["tiny"]),
        "--reference",
        str(tiny_ckpt),
        "--steps",
        "6",
        "--json",
        str(tmp_path / "v.json"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation passed" in r.stdout
    report = json.loads((tmp_path / "v.json").read_text())
    assert set(report) == REPORT_KEYS and report["ok"] and report["same_checkpoint"] and report["notes"] == []
    assert all(set(c) == CHECK_KEYS for c in report["checks"])
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["denoise logits max abs error"]["measured"] < 1e-4 and checks["denoise logits max abs error"]["ok"]
    assert checks["denoise logits error, 99th pct over positions"]["bound"] == 1e-3
    assert checks["end to end token agreement (shared noise)"]["measured"] == 1.0
    assert report["details"]["denoise_positions_compared"] == 3 * 2 * 6 * 16  # prompts x canvases x steps x C


def test_a_perturbed_weight_fails_validation(
    cli: Cli, tmp_path: Path, tiny_ckpt: Path, exports: dict[str, Path]
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(exports["tiny"], broken)
    norm = ir.load(broken / "denoise.onnx").graph.initializers["model.layers.2.post_attention_layernorm.weight"]
    weights = np.memmap(broken / "weights.bin", dtype=np.uint8, mode="r+")
    weights[norm.const_value.offset : norm.const_value.offset + 4].view(np.float32)[0] += 0.5  # one weight
    weights.flush()
    # As an exporter bug would write it: a wrong weight with a manifest that matches it (so loading succeeds).
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["weights"]["sha256"] = file_sha256(broken / "weights.bin")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    r = cli("validate", str(broken), "--reference", str(tiny_ckpt), "--steps", "4")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "validation FAILED" in r.stdout
    assert r.stdout.split("denoise logits error, 99th pct over positions")[1].splitlines()[0].endswith("FAIL")


def test_fp16_bounds_come_from_the_precisions_own_error(fp16_export: Path, two_layer_ckpt: Path) -> None:
    from dgrt.validate import validate as run

    report = run(fp16_export, two_layer_ckpt, steps=4, canvases=1)
    assert report.ok, report.format()
    baseline = report.details["baseline"]
    checks = {c.name: c for c in report.checks}
    assert checks["denoise logits mean abs error"].bound == pytest.approx(2 * baseline["logits_mean_abs_error"] + 1e-4)
    assert checks["end to end token agreement (shared noise)"].bound is None


def test_without_a_tokenizer_random_token_id_prompts_are_validated(
    tmp_path: Path, tiny_ckpt: Path, untokenized_export: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["validate", str(untokenized_export), "--reference", str(tiny_ckpt), "--steps", "2",
                 "--canvases", "1", "--json", str(tmp_path / "v.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "note: no tokenizer: validated on 3 random token-id prompts of lengths 12, 24, 48" in out
    assert "note: no tokenizer: the task metrics were skipped (they score text answers)" in out
    report = json.loads((tmp_path / "v.json").read_text())
    prompts = report["details"]["prompts"]
    assert [len(p) for p in prompts] == [12, 24, 48]
    special = {0, 1, 2, 253, 254, 255}  # the tiny preset's pad, EOS, BOS and image token ids
    assert not special & {t for p in prompts for t in p} and all(0 <= t < 256 for p in prompts for t in p)
    assert not any(c["name"].startswith("task") for c in report["checks"])


def test_token_id_prompts_are_validated_as_given(tiny_ckpt: Path, untokenized_export: Path) -> None:
    from dgrt.validate import validate as run

    report = run(untokenized_export, tiny_ckpt, prompts=[[5, 6, 7], [9]], steps=2, canvases=1, task_examples=0)
    assert report.ok and report.details["prompts"] == [[5, 6, 7], [9]] and report.notes == []
    assert report.details["denoise_positions_compared"] == 2 * 1 * 2 * 16  # prompts x canvases x steps x C
    args = build_parser().parse_args(["validate", "x", "--reference", "y", "--prompt-ids", "5,6,7", "--prompt", "Hi",
                                      "--prompt-ids", "9"])  # fmt: skip
    assert args.prompts == [[5, 6, 7], "Hi", [9]]  # text and ids in the order given


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "hello"], "has no tokenizer files to encode the text prompt 'hello'; pass token ids instead"),
        (["--prompt-ids", "5,256"], "--prompt-ids has 256; expected integers from 0 to 255."),
        (["--canvases", "0"], "--canvases is 0; expected an integer of at least 1."),
        (["--canvases", "300"], "a prompt of 12 tokens and --canvases 300 of 16 need a context of 4812 tokens"),
        (["--steps", "0"], "--steps is 0; expected an integer of at least 1."),
        (["--seed", "-1"], "--seed is -1; expected an integer from 0 to 9223372036854775807."),
        (["--seed", str(2**63)], "--seed is 9223372036854775808; expected an integer from 0 to 9223372036854775807."),
    ],
)
def test_bad_prompts_and_numbers_are_refused_in_one_line(
    tiny_ckpt: Path, untokenized_export: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["validate", str(untokenized_export), "--reference", str(tiny_ckpt), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgrt: error: ") and message in err and err.count("\n") == 1
