"""Generated malformed inputs: whatever is broken in a manifest, a config or a safetensors header, and
whatever numbers reach the command line, dgrt answers with one `dgrt: error:` sentence (exit 2) or works;
never a traceback, and nothing outside the output folder changes."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from dgrt.checkpoint import Checkpoint
from dgrt.cli import main
from dgrt.contract import manifest as manifest_mod
from dgrt.errors import DgrtError

# Values a careless or hostile file puts where something else belongs.
ODD_VALUES: list[Any] = [
    None, True, 0, -1, 2**63, 1.5, -0.0, 1e308, "", "x", "../x", "/etc/passwd", "\ud800", [], [1, "a"], {}, {"a": None},
]  # fmt: skip


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON value."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):  # the first few items of long lists (per-layer K/V) are enough
            out += _paths(v, (*prefix, i))
    return out


def mutate(data: Any, rng: random.Random) -> Any:
    """A copy of `data` with one value deleted or replaced by an odd one."""
    data = json.loads(json.dumps(data))
    path = rng.choice(_paths(data))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(ODD_VALUES)
    return data


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8", errors="surrogatepass")


@pytest.fixture(scope="module")
def export_copy(exports: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(exports["tiny"], tmp_path_factory.mktemp("fuzz") / "export"))


def test_mutated_manifests_load_or_give_one_sentence(export_copy: Path) -> None:
    original = json.loads((export_copy / "manifest.json").read_text())
    rng, outcomes = random.Random(0), {"refused": 0, "loaded": 0}
    for _ in range(300):
        _write_json(export_copy / "manifest.json", mutate(original, rng))
        try:
            manifest_mod.load(export_copy)
            outcomes["loaded"] += 1  # a change that does not matter (a doc string, the creation date)
        except DgrtError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    _write_json(export_copy / "manifest.json", original)
    assert outcomes["refused"] > 200, outcomes  # most changes matter, and every one of those was refused


def test_mutated_configs_open_or_give_one_sentence(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))
    rng = random.Random(1)
    for name in ("config.json", "generation_config.json"):
        original = json.loads((ckpt / name).read_text())
        for _ in range(150):
            _write_json(ckpt / name, mutate(original, rng))
            try:
                Checkpoint.open(ckpt)
            except DgrtError as e:
                assert "\n" not in str(e)
        _write_json(ckpt / name, original)


def test_mutated_safetensors_headers_open_or_give_one_sentence(tiny_ckpt: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))
    file = ckpt / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    rng = random.Random(2)
    for _ in range(150):
        text = json.dumps(mutate(header, rng)).encode("utf-8", "surrogatepass")
        file.write_bytes(len(text).to_bytes(8, "little") + text + body)
        try:
            Checkpoint.open(ckpt)
        except DgrtError as e:
            assert "\n" not in str(e)


# Numbers out of range on every command that takes them: each one sentence, exit 2, before any work.
BAD_NUMBERS = [
    ["generate", "{export}", "hi", "--steps", "0"],
    ["generate", "{export}", "hi", "--steps", "-5"],
    ["generate", "{export}", "hi", "--max-new-tokens", "0"],
    ["generate", "{export}", "hi", "--max-new-tokens", "-1"],
    ["generate", "{export}", "hi", "--seed", "18446744073709551616"],
    ["generate", "{export}", "hi", "--seed", "-1"],
    ["generate", "{export}", "hi", "--t-max", "inf"],
    ["generate", "{export}", "hi", "--t-max", "nan"],
    ["generate", "{export}", "hi", "--t-min", "0.9", "--t-max", "0.5"],
    ["generate", "{export}", "hi", "--entropy-bound", "0"],
    ["generate", "{export}", "hi", "--entropy-bound", "-inf"],
    ["generate", "{export}", "hi", "--stability-threshold", "1000000000"],
    ["generate", "{export}", "hi", "--stability-threshold", "-1"],
    ["generate", "{export}", "hi", "--confidence-threshold", "nan"],
    ["generate", "{export}", "hi", "--threads", "-1"],
    ["generate", "{export}", "hi", "--threads", "0"],
    ["generate", "{export}", "hi", "--eos-id", "-3"],
    ["generate", "{export}", "hi", "--eos-id", "99999999"],
    ["generate", "{export}", "--raw", "\udcff"],
    ["bench", "{export}", "--runs", "0"],
    ["bench", "{export}", "--runs", "-2"],
    ["bench", "{export}", "--threads", "-1"],
    ["bench", "{export}", "--steps", "0"],
    ["bench", "{export}", "--prompt-lengths", "0"],
    ["validate", "{export}", "--reference", "{ckpt}", "--canvases", "0"],
    ["validate", "{export}", "--reference", "{ckpt}", "--steps", "0"],
    ["validate", "{export}", "--reference", "{ckpt}", "--seed", "-1"],
    ["export", "{ckpt}", "-o", "{out}", "--max-context", "0"],
    ["export", "{ckpt}", "-o", "{out}", "--max-context", "99999999999"],
    ["export", "{ckpt}", "-o", "{out}", "--opset", "7"],
    ["export", "{ckpt}", "-o", "{out}", "--calibration-samples", "0", "--quant", "fp8"],
    ["tiny", "{out}", "--seed", "-1"],
    ["build", "{export}", "--max-batch", "0"],
    ["build", "{export}", "--workspace", "-1"],
]


@pytest.mark.parametrize("argv", BAD_NUMBERS, ids=[" ".join(a[:1] + a[2:]) for a in BAD_NUMBERS])
def test_out_of_range_numbers_are_one_sentence(
    argv: list[str], export_copy: Path, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    filled = [a.format(export=export_copy, ckpt=tiny_ckpt, out=tmp_path / "out") for a in argv]
    try:
        code = main(filled)
    except SystemExit as e:  # argparse's own refusals (a value that is not a number) exit from the parser
        code = e.code
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgrt: error: "), captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
