"""Writing outputs safely: what dgrt refuses to write, and what survives a failure, an interrupt or a
second writer. Nothing here exports: refusals happen before any work, and `atomic_dir` is used directly."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dgrt.cli import main
from dgrt.errors import DgrtError
from dgrt.fsutil import atomic_dir, atomic_write_text, check_output


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder`, hidden ones included, with its contents (None for a folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def dead_pid() -> int:
    """The pid of a process that has exited: what a killed dgrt leaves behind."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def make_output(path: Path, text: str = "old") -> Path:
    path.mkdir(parents=True)
    (path / "result.txt").write_text(text)
    return path


@pytest.fixture
def work(tmp_path: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp/work/{notes.txt, models/ck (a checkpoint), other/data.txt}, the current folder being tmp/work."""
    work = tmp_path / "work"
    (work / "other").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    (work / "other" / "data.txt").write_text("mine too")
    shutil.copytree(tiny_ckpt, work / "models" / "ck")
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize(
    ("cwd", "args", "message"),
    [
        (".", ["tiny", ".", "--force"], "refusing to write to the current folder or one of its parents"),
        ("other", ["tiny", "..", "--force"], "refusing to write to the current folder or one of its parents"),
        ("other", ["export", "../models/ck", "-o", ".", "--force"], "refusing to write to the current folder"),
        (".", ["export", "models/ck", "-o", "models/ck", "--force"], "is the input folder models/ck"),
        (".", ["export", "models/ck", "-o", "models/ck/onnx"], "is inside the input folder models/ck"),
        (".", ["export", "models/ck", "-o", "models", "--force"], "contains the input folder models/ck"),
    ],
)
def test_an_output_that_would_destroy_files_is_refused_and_nothing_changes(
    work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], cwd: str, args: list[str],
    message: str,
) -> None:  # fmt: skip
    from dgrt.exporter import onnx_export

    def no_tracing(*_: object) -> None:
        raise AssertionError("the output must be refused before the model is built and traced")

    monkeypatch.setattr(onnx_export, "meta_model", no_tracing)
    monkeypatch.chdir(work / cwd)
    before = snapshot(work.parent)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgrt: error: ") and err.count("\n") == 1 and message in err, err
    assert snapshot(work.parent) == before


def test_the_filesystem_root_is_refused() -> None:
    with pytest.raises(DgrtError, match="refusing to write to the filesystem root"):
        check_output("/", force=True)


def test_replacing_with_force_leaves_only_the_new_output(tmp_path: Path) -> None:
    out = make_output(tmp_path / "out")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "result.txt").write_text("new")
    assert snapshot(tmp_path) == {"out": None, "out/result.txt": b"new"}  # no aside copy, temp folder or lock


@pytest.mark.parametrize("failure", [RuntimeError("the writer failed midway"), KeyboardInterrupt()])
def test_a_writer_that_fails_or_is_interrupted_keeps_the_old_output(tmp_path: Path, failure: BaseException) -> None:
    out = make_output(tmp_path / "out")
    before = snapshot(tmp_path)
    with pytest.raises(type(failure)):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "result.txt").write_text("half")
            raise failure
    assert snapshot(tmp_path) == before


def test_an_interrupt_between_the_two_renames_puts_the_old_output_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make_output(tmp_path / "out")
    before = snapshot(tmp_path)
    rename = Path.rename

    def interrupted_rename(self: Path, target: str | Path) -> Path:
        if self.name.endswith(".tmp"):  # the new output going in, after the old one went aside
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "result.txt").write_text("new")
    assert snapshot(tmp_path) == before


def test_an_interrupted_command_prints_one_line_and_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dgrt.presets

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the weights are being written

    out = make_output(tmp_path / "ck")
    before = snapshot(tmp_path)
    monkeypatch.setattr(dgrt.presets, "save_file", interrupted)
    assert main(["tiny", str(out), "--force"]) == 130
    assert capsys.readouterr().err == "dgrt: interrupted\n"
    assert snapshot(tmp_path) == before


def test_a_system_error_is_one_line_and_a_bug_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dgrt.presets

    full = tmp_path / "ck" / "model.safetensors"

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(full))

    monkeypatch.setattr(dgrt.presets, "save_file", disk_full)
    assert main(["tiny", str(tmp_path / "ck")]) == 2
    assert capsys.readouterr().err == f"dgrt: error: {full}: No space left on device\n"
    assert list(tmp_path.iterdir()) == []

    def bug(*_: object, **__: object) -> None:
        raise ValueError("a bug in dgrt")

    monkeypatch.setattr(dgrt.presets, "save_file", bug)
    with pytest.raises(ValueError, match="a bug in dgrt"):
        main(["tiny", str(tmp_path / "ck")])


# A writer that holds its output open until it reads a line.
HOLDER = """
import sys
from dgrt.fsutil import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "result.txt").write_text("first writer")
    print("writing", flush=True)
    sys.stdin.readline()
"""


def test_a_second_writer_to_the_same_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ck"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None and first.stdout.readline() == "writing\n"
        assert main(["tiny", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by another dgrt process (pid {first.pid})" in err and err.count("\n") == 1, err
        with pytest.raises(DgrtError, match=f"pid {first.pid}"):  # also when it gets past the first check
            with atomic_dir(out, force=True):
                pass
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    assert snapshot(tmp_path) == {"ck": None, "ck/result.txt": b"first writer"}  # and its lock is gone


def test_a_killed_writers_lock_and_temporary_folders_are_cleaned_up(tmp_path: Path) -> None:
    out = make_output(tmp_path / "out")
    killed = dead_pid()
    (tmp_path / ".out.lock").write_text(f"{killed}\n")
    make_output(tmp_path / f".out.{killed}.k2j4x9.tmp", "half-written")
    make_output(tmp_path / f".out.{killed}.3f9a02c1.old", "older")  # killed after the swap, before the delete
    make_output(tmp_path / ".out.backup", "the user's own")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "result.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.backup", "out"]
    assert (out / "result.txt").read_text() == "new"


def test_a_writer_killed_between_the_renames_gets_the_old_output_back(tmp_path: Path) -> None:
    killed = dead_pid()
    make_output(tmp_path / f".out.{killed}.3f9a02c1.old", "old")  # renamed aside...
    make_output(tmp_path / f".out.{killed}.k2j4x9.tmp", "new")  # ...and the new one not yet renamed in
    with pytest.raises(DgrtError, match="already exists"):  # the old output is back: --force to replace it
        with atomic_dir(tmp_path / "out"):
            pass
    assert snapshot(tmp_path) == {"out": None, "out/result.txt": b"old"}


def test_a_planted_symlink_at_a_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".r.json.tmp").symlink_to(victim)  # the name dgrt used to write through
    atomic_write_text(tmp_path / "r.json", "{}\n")
    assert (tmp_path / "r.json").read_text() == "{}\n" and victim.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.json.tmp", "r.json", "victim.txt"]


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "{export}", "--json", "{dir}"],
        ["bench", "{export}", "--plot", "{dir}"],
        ["validate", "{export}", "--reference", "{export}", "--json", "{dir}"],
        ["build", "{export}", "--timing-cache", "{dir}"],
    ],
)
def test_a_result_file_that_is_a_directory_is_refused_before_the_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    (tmp_path / "results").mkdir()
    # The export does not exist: the command is refused before it is even looked at.
    argv = [a.format(export=tmp_path / "no-export", dir=tmp_path / "results") for a in args]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"dgrt: error: {tmp_path / 'results'}: is a directory; expected a file path.\n"
    with pytest.raises(DgrtError, match="is a directory"):
        atomic_write_text(tmp_path / "results", "{}\n")
