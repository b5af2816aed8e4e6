"""Writing outputs so that neither a crash, an interrupt nor a second writer loses data.

An output folder is written as a hidden temporary sibling (`.NAME.<pid>.<random>.tmp`, on the same
filesystem, so renames are atomic) and renamed into place; an existing output is first renamed aside
(`.NAME.<pid>.<random>.old`) and deleted only once the new one is in, so at any moment the old or the new
output exists. A lock file beside the output (`.NAME.lock`, flock-ed, holding the writer's pid) keeps a
second writer out; the kernel releases it when its process dies, so a stale lock is simply taken over.
Leftovers of a killed writer (its pid dead) are removed, or restored if the output is missing, by the next
write.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from dgrt.errors import DgrtError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _named(given: str | Path, resolved: Path) -> str:
    """The path as the user wrote it, with where it resolves to when that differs."""
    return str(given) if str(given) == str(resolved) else f"{given} ({resolved})"


def _cannot_write(path: str | Path, e: OSError) -> DgrtError:
    return DgrtError(f"{path}: cannot write here ({e.strerror}).")


def check_output(out_dir: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse, in one sentence and before any work, an output folder that dgrt must not write; returns it
    resolved.

    Refused: the filesystem root, the current folder or one of its parents, an input folder (the folders
    the command reads) or a folder inside or around one, a file, another writer's output in progress, a
    folder that cannot be created, and an existing non-empty folder unless `force`.
    """
    out = _check(out_dir, force, inputs)
    pid = _lock_holder(_lock_path(out))
    if pid is not None:
        raise _locked(out_dir, out, pid)
    # Permission bits do not tell everything (root may "write" in /proc, a read-only mount): make and
    # remove a folder where the output's folders will be made.
    existing = next(p for p in out.parents if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dgrt-probe.", dir=existing))
    except OSError as e:
        raise _cannot_write(out_dir, e) from None
    return out


def _check(out_dir: str | Path, force: bool, inputs: Iterable[str | Path]) -> Path:
    out = Path(out_dir).resolve()
    name = _named(out_dir, out)
    if out.parent == out:
        raise DgrtError(f"{name}: refusing to write to the filesystem root; expected a folder to create.")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise DgrtError(
            f"{name}: refusing to write to the current folder or one of its parents, which would replace it; "
            "expected a folder inside it."
        )
    for given in inputs:
        source = Path(given).resolve()
        if out == source:
            raise DgrtError(f"{name}: is the input folder {given}; expected a different output folder.")
        if source in out.parents:
            raise DgrtError(f"{name}: is inside the input folder {given}; expected a folder outside it.")
        if out in source.parents:
            raise DgrtError(f"{name}: contains the input folder {given}; expected a folder outside it.")
    if out.exists() and not out.is_dir():
        raise DgrtError(f"{out_dir}: exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DgrtError(f"{out_dir}: already exists and is not empty (pass --force to replace it).")
    existing = next(p for p in out.parents if p.exists())  # the folder that new folders will be made in
    if not existing.is_dir():
        raise DgrtError(f"{out_dir}: cannot write here ({existing} is not a directory).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DgrtError(f"{out_dir}: cannot write here (no write permission in {existing}).")
    return out


def check_output_file(path: str | Path) -> None:
    """Refuse, before any work, a file path that `atomic_write_bytes` could not write."""
    path = Path(path)
    if path.is_dir():
        raise DgrtError(f"{path}: is a directory; expected a file path.")
    if not path.parent.is_dir():
        raise DgrtError(f"{path}: cannot write here (the folder {path.parent} does not exist).")


@contextmanager
def atomic_dir(out_dir: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir` by a rename.

    `check_output` runs first (`inputs`: the folders the caller reads). An existing output is replaced
    only with `force`, and is kept whenever the caller raises or is interrupted. On any error the
    temporary folder is removed.
    """
    inputs = tuple(inputs)
    out = check_output(out_dir, force, inputs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(out_dir, e) from None
    with _lock(out_dir, out):
        _clean_leftovers(out)
        _check(out_dir, force, inputs)  # again: the state may have changed before the lock was taken
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        except OSError as e:
            raise _cannot_write(out_dir, e) from None
        try:
            yield tmp
            _swap_in(tmp, out)
        except BaseException:
            _remove_tree(tmp)
            raise


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is renamed aside first and deleted once `tmp` is in."""
    if not out.exists():
        tmp.rename(out)
        return
    aside = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.old")
    try:
        out.rename(aside)
        tmp.rename(out)
    except BaseException:
        if aside.exists() and not out.exists():  # interrupted between the renames: the old one goes back
            aside.rename(out)
        raise
    _discard(aside, out)


def _remove_tree(path: Path) -> None:
    """Delete a folder, including read-only subfolders (whose entries cannot be unlinked otherwise)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except PermissionError:
        path.chmod(0o700)
        for folder, subfolders, _ in os.walk(path):
            for sub in subfolders:
                os.chmod(os.path.join(folder, sub), 0o700)
        shutil.rmtree(path)


def _discard(path: Path, out: Path) -> None:
    """Delete a replaced or abandoned folder; failing that, say so and leave it to the next write."""
    try:
        _remove_tree(path)
    except OSError as e:
        print(f"dgrt: warning: could not remove {path} ({e.strerror}); the next write to {out} retries.",
              file=sys.stderr)  # fmt: skip


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _clean_leftovers(out: Path) -> None:
    """Remove the temporary folders of killed writers of `out`; if a killed writer had already renamed
    the old output aside and not yet renamed its new one in, put the old one back."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[^.]+\.(tmp|old)")
    for entry in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or _pid_alive(int(match[1])):
            continue
        if match[2] == "old" and not out.exists():
            entry.rename(out)
        else:
            _discard(entry, out)


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _locked(given: str | Path, out: Path, pid: int) -> DgrtError:
    holder = f" (pid {pid})" if pid else ""
    return DgrtError(f"{_named(given, out)}: is being written by another dgrt process{holder}; try again when it ends.")


def _read_pid(fd: int) -> int:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else 0


def _lock_holder(lock: Path) -> int | None:
    """The pid holding `lock` (0 when it has not written it yet), or None when nobody holds it."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)  # also releases the probe's shared lock
    return None


@contextmanager
def _lock(given: str | Path, out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside `out` for the duration; a second writer gets one sentence naming our pid."""
    lock = _lock_path(out)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise _cannot_write(given, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise _locked(given, out, pid) from None
        with suppress(FileNotFoundError):
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # the previous holder removed this file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        lock.unlink(missing_ok=True)  # before closing, so nobody locks a file that is about to vanish
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a new, uniquely named temporary file (never one planted there: created
    exclusively, so a symlink is not followed) and a rename. A directory at `path` is refused."""
    path = Path(path)
    check_output_file(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise
