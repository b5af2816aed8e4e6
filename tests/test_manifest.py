"""The export contract: manifest.json is validated on load, its files confined to the export directory,
and weights.bin checked against its sha256 (once, then cached), by every command that reads an export."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import dgrt
from dgrt.cli import main
from dgrt.contract import manifest as manifest_mod
from dgrt.contract.manifest import VERIFIED_FILE, Manifest
from dgrt.errors import DgrtError, DgrtWarning
from dgrt.exporter.lint import lint_export


@pytest.fixture
def export_copy(exports: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the tiny fp32 export, free to break (1.3 MiB)."""
    return Path(shutil.copytree(exports["tiny"], tmp_path / "export"))


def edit_manifest(export_dir: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Apply `change` to manifest.json: it edits the dict in place, or returns a replacement."""
    path = export_dir / "manifest.json"
    data = json.loads(path.read_text())
    result = change(data)
    path.write_text(json.dumps(data if result is None else result))


def drop(*path: str | int) -> Callable[[dict[str, Any]], None]:
    """A change that deletes the value at `path`."""

    def change(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]  # type: ignore[index]
        del data[path[-1]]  # type: ignore[arg-type]

    return change


def test_a_loaded_manifest_is_typed_and_round_trips(exports: dict[str, Path]) -> None:
    manifest = manifest_mod.load(exports["tiny"])
    assert isinstance(manifest, Manifest)
    assert manifest.dtype == "fp32" and manifest.canvas_length == 16 and manifest.config.num_layers == 4
    assert [t.name for t in manifest.graphs["prefill"].spec.inputs[:3]] == ["input_ids", "position_ids", "pad_lengths"]
    assert manifest.weights.file == "weights.bin" and manifest.weights.sha256.startswith("sha256:")
    on_disk = json.loads((exports["tiny"] / "manifest.json").read_text())
    assert manifest.to_json() == on_disk  # the typed form says exactly what the file says


# Each breaks manifest.json one way; the sentence must name what is wrong.
MANIFEST_CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "a list": (lambda m: [m], "expected a JSON object, got list"),
    "no graphs": (drop("graphs"), "'graphs' is missing, expected an object"),
    "no config": (drop("config"), "'config' is missing, expected an object"),
    "no weights": (drop("weights"), "'weights' is missing, expected an object"),
    "no max_context": (drop("max_context"), "'max_context' is missing"),
    "no dtype": (drop("dtype"), "'dtype' is missing, expected one of fp32, fp16, bf16"),
    "unknown dtype": (lambda m: m.update(dtype="fp64"), "'dtype' is 'fp64', expected one of fp32, fp16, bf16"),
    "max_context a string": (lambda m: m.update(max_context="4096"), "'max_context' is '4096', expected an integer"),
    "max_context below the canvas": (lambda m: m.update(max_context=8), "expected more than the canvas (16)"),
    "prefill_chunk beyond the context": (
        lambda m: m.update(prefill_chunk=4097),
        "'prefill_chunk' is 4097, expected at most max_context (4096)",
    ),
    "prefill_chunk zero": (lambda m: m.update(prefill_chunk=0), "'prefill_chunk' is 0, expected an integer >= 1"),
    "a graph without sha256": (
        drop("graphs", "prefill", "sha256"),
        "graphs.prefill: 'sha256' is missing",
    ),
    "a malformed sha256": (
        lambda m: m["graphs"]["denoise"].update(sha256="abc"),
        "'sha256' is 'abc', expected 'sha256:' and 64 hex digits",
    ),
    "a graph without inputs": (drop("graphs", "prefill", "inputs"), "graphs.prefill: 'inputs' is missing"),
    "an input renamed": (
        lambda m: m["graphs"]["denoise"]["inputs"][0].update(name="ids"),
        "graphs.denoise: inputs[0] is",
    ),
    "a layer dropped from the I/O": (
        drop("graphs", "prefill", "inputs", -1),
        "graphs.prefill: inputs[11] is nothing, but the contract of its config and dtype expects",
    ),
    "a third graph": (lambda m: m["graphs"].update(extra={}), "'graphs' names ['denoise', 'extra', 'prefill']"),
    "vocab_size disagrees with the config": (
        lambda m: m.update(vocab_size=7),
        "'vocab_size' is 7, but its config implies 256",
    ),
    "a broken config": (lambda m: m["config"].update(model_type="llama"), "config: model_type is 'llama'"),
    "a graph file outside the folder": (
        lambda m: m["graphs"]["prefill"].update(file="../prefill.onnx"),
        "'file' is '../prefill.onnx', expected a plain file name inside the export directory",
    ),
    "an absolute weights path": (
        lambda m: m["weights"].update(file="/etc/passwd"),
        "weights: 'file' is '/etc/passwd', expected a plain file name",
    ),
    "both graphs in one file": (
        lambda m: m["graphs"]["prefill"].update(file="denoise.onnx"),
        "both graphs name the file 'denoise.onnx'",
    ),
    "weights.bytes negative": (lambda m: m["weights"].update(bytes=-1), "weights: 'bytes' is -1"),
    "NaN in the JSON": (
        lambda m: json.loads(json.dumps(m).replace('"max_context": 4096', '"max_context": NaN')),
        "not valid JSON",
    ),  # fmt: skip
    "a future format": (lambda m: m.update(format_version=2), "format_version 2 is not supported"),
    "an unknown quantization recipe": (
        lambda m: m.update(quantization={"recipe": "int2"}),
        "quantization.recipe is 'int2', expected one of fp8, int4, int4-experts",
    ),
    "session config not strings": (
        lambda m: m.update(onnxruntime={"session_config": {"a": 1}}),
        "onnxruntime.session_config",
    ),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_malformed_manifest_is_one_sentence(export_copy: Path, case: str) -> None:
    change, message = MANIFEST_CASES[case]
    edit_manifest(export_copy, change)
    with pytest.raises(DgrtError) as raised:
        manifest_mod.load(export_copy)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_non_utf8_manifest(export_copy: Path) -> None:
    (export_copy / "manifest.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(DgrtError, match="not UTF-8 text"):
        manifest_mod.load(export_copy)


def test_a_graph_replaced_by_the_other_is_caught(export_copy: Path) -> None:
    shutil.copy(export_copy / "denoise.onnx", export_copy / "prefill.onnx")
    with pytest.raises(DgrtError, match="prefill.onnx does not match the prefill graph"):
        manifest_mod.load(export_copy)
    # Even with the digest rewritten to match, lint sees the graph's inputs are not the prefill graph's.
    edit_manifest(export_copy, lambda m: m["graphs"]["prefill"].update(sha256=manifest_mod.file_sha256(
        export_copy / "prefill.onnx")))  # fmt: skip
    report = lint_export(export_copy)
    assert not report.ok and any("are not the" in e and "prefill graph" in e for e in report.errors)


def flip_bytes(path: Path, offset: int = 4096, count: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(b ^ 0xFF for b in data[offset : offset + count])
    path.write_bytes(bytes(data))


def test_corrupt_weights_are_refused_by_every_command(export_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_mod.load(export_copy)  # verified once: the stamp is cached ...
    assert (export_copy / VERIFIED_FILE).exists()
    flip_bytes(export_copy / "weights.bin")  # ... but a changed file no longer matches it
    for argv in (
        ["generate", str(export_copy), "hi", "--max-new-tokens", "4"],
        ["lint", str(export_copy)],
        ["bench", str(export_copy), "--runs", "1"],
        ["build", str(export_copy)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dgrt: error: ") and "does not match the sha256" in err[0], argv


def test_all_nan_weights_of_the_right_size_are_refused(export_copy: Path) -> None:
    (export_copy / VERIFIED_FILE).unlink()
    size = (export_copy / "weights.bin").stat().st_size
    (export_copy / "weights.bin").write_bytes(b"\xff\xff\xc0\x7f" * (size // 4) + b"\0" * (size % 4))  # fp32 NaN
    with pytest.raises(DgrtError, match="does not match the sha256 in manifest.json"):
        dgrt.load(export_copy)


def test_verification_is_cached_and_can_be_turned_off_loudly(export_copy: Path) -> None:
    stamp = json.loads((export_copy / VERIFIED_FILE).read_text())  # written by the export, which hashed it
    assert stamp["sha256"] == manifest_mod.load(export_copy).weights.sha256
    flip_bytes(export_copy / "weights.bin")
    with pytest.warns(DgrtWarning, match="was not checked against manifest.json's sha256"):
        gen = dgrt.load(export_copy, verify=False)
    gen.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DgrtError, match="does not match the sha256"):
            dgrt.load(export_copy)


def test_no_verify_from_the_command_line_warns_on_one_line(
    export_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flip_bytes(export_copy / "weights.bin", offset=0, count=4)  # the first bytes: an embedding row
    argv = ["generate", str(export_copy), "hi", "--max-new-tokens", "4", "--steps", "2", "--no-verify"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "dgrt: warning: " in err and "not checked against manifest.json's sha256" in err
    assert "Traceback" not in err and "DgrtWarning" not in err


def test_a_manifest_missing_its_weights_file(export_copy: Path) -> None:
    (export_copy / "weights.bin").unlink()
    with pytest.raises(DgrtError, match="weights.bin is missing"):
        manifest_mod.load(export_copy)
