"""Hugging Face Hub model ids in place of checkpoint folders, offline, against a cache laid out the way
huggingface_hub writes one (blobs named by hash, refs naming commits, snapshots of relative symlinks)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dgrt
from dgrt.errors import DgrtError
from dgrt.hub import is_model_id, resolve
from dgrt.presets import write_tiny
from tests.conftest import Cli

MODEL = "acme/diffusiongemma-tiny"
MAIN, OLD = "a" * 40, "b" * 40  # commit hashes


def add_snapshot(cache: Path, model_id: str, commit: str, checkpoint: Path, branch: str | None) -> Path:
    """Put `checkpoint`'s files into the Hub cache as commit `commit` of `model_id`."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in checkpoint.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    if branch:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    """MODEL at main (the tiny preset) and at an older commit (the small preset)."""
    cache = tmp_path_factory.mktemp("hub")
    add_snapshot(cache, MODEL, MAIN, tiny_ckpt, branch="main")
    add_snapshot(cache, MODEL, OLD, write_tiny(tmp_path_factory.mktemp("old") / "small", preset="small"), None)
    return cache


@pytest.fixture
def offline(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE at import: set them where it keeps them."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_what_reads_as_a_model_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_model_id("google/diffusiongemma-26B-A4B-it")
    (tmp_path / "out" / "export").mkdir(parents=True)
    assert not is_model_id("out/export")  # an existing folder is a folder
    for path in ("./a/b", "/a/b", "a/b/c", "a", "../b", "a/.."):
        assert not is_model_id(path)


def test_inspect_a_model_id_from_the_cache_at_a_revision(hub_cache: Path) -> None:
    """The real executable, with the environment variables users set."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    cmd = [sys.executable, "-m", "dgrt", "inspect", MODEL, "--revision", OLD]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"snapshots/{OLD}" in run.stdout and "hidden         128," in run.stdout


def test_main_is_the_default_revision_and_a_missing_model_is_one_sentence(offline: Path, cli: Cli) -> None:
    main = cli("inspect", MODEL)
    assert main.returncode == 0, main.stderr
    assert f"snapshots/{MAIN}" in main.stdout and "hidden         64," in main.stdout
    missing = cli("inspect", "acme/not-downloaded")
    assert missing.returncode == 2
    assert missing.stderr == (
        "dgrt: error: acme/not-downloaded is not a local folder and not in the Hugging Face cache, and the Hub "
        "cannot be reached (HF_HUB_OFFLINE is set); fetch it once where it can (`hf download acme/not-downloaded`) "
        "or pass a checkpoint folder.\n"
    )


def test_export_and_load_by_model_id(offline: Path, cli: Cli, tiny_ckpt: Path, tmp_path: Path) -> None:
    result = cli("export", MODEL, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    by_id = dgrt.load(MODEL, backend="torch").generate("hello", seed=3, max_new_tokens=8)
    by_folder = dgrt.load(tiny_ckpt, backend="torch").generate("hello", seed=3, max_new_tokens=8)
    exported = dgrt.load(tmp_path / "out").generate("hello", seed=3, max_new_tokens=8)
    assert by_id.tokens == by_folder.tokens == exported.tokens


def test_revision_and_missing_models_are_refused_in_one_sentence(offline: Path, cli: Cli, tiny_ckpt: Path) -> None:
    result = cli("inspect", tiny_ckpt, "--revision", OLD)
    assert result.returncode == 2
    assert result.stderr == f"dgrt: error: --revision {OLD} pins a Hugging Face Hub model id, and no argument is one.\n"
    with pytest.raises(DgrtError, match=f"{MODEL} at revision v9 is not a local folder .* --revision v9"):
        resolve(MODEL, "v9")
    with pytest.raises(DgrtError, match="revision 'v9' pins a Hugging Face Hub model id; .* is a local path"):
        dgrt.load(tiny_ckpt, backend="torch", revision="v9")
