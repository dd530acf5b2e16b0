"""Where the ``hf-helu`` commands write: DST checks that refuse before the (slow) model load, and one writer per DST.

DST never aliases SRC: not the same folder, not one inside the other, whatever links, mounts or flags lead there
(replacing DST would delete SRC, or SRC would be copied into itself). Two commands writing the same DST at once: the
first takes ``.<DST name>.lock`` beside DST (kept there, empty, like the Hub cache's locks) and the second is refused;
without ``--overwrite`` a DST that appeared while writing is never replaced (:func:`hf_helu.atomic.atomic_directory`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import filelock

from hf_helu.errors import UsageError


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder ``path`` leads to, or None when there is none: one folder reached two ways
    (a link, a bind mount) has one identity."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _same(a: Path, b: Path) -> bool:
    return a == b or (_identity(a) is not None and _identity(a) == _identity(b))


def check_not_aliased(src: Path, dst: str) -> None:
    """Refuse a DST that is SRC, is inside it, or holds it, compared as resolved paths and as (device, inode)."""
    source, target = src.resolve(), Path(dst).expanduser().resolve()
    if _same(source, target):
        raise UsageError(
            f"DST {dst!r} is SRC {str(src)!r} (the same folder, resolved {str(source)!r}): writing DST would replace "
            "SRC and delete the files in it; choose another folder"
        )
    if any(_same(source, parent) for parent in target.parents):
        raise UsageError(f"DST {dst!r} is inside SRC {str(src)!r}: choose a folder outside it")
    if any(_same(target, parent) for parent in source.parents):
        raise UsageError(f"DST {dst!r} holds SRC {str(src)!r}: writing DST would replace SRC; choose another folder")


def _first_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _probe_folder(folder: Path, what: str) -> None:
    """Fail now when ``folder`` (or the first existing folder above it) cannot take new entries."""
    existing = _first_existing(folder)
    if not existing.is_dir():
        raise UsageError(f"cannot write {what}: {str(existing)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".hf_helu_probe."))
    except OSError as error:
        raise UsageError(f"cannot write {what}: folder {str(existing)!r} is not writable ({error.strerror})") from None


def check_destination(dst: str, overwrite: bool) -> None:
    """Fail before the (slow) load when DST would be refused or could not be written at the end."""
    path = Path(dst).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"DST {dst!r} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"DST {dst!r} exists and is not empty; pass --overwrite to replace it")
    if path.is_dir() and not path.is_symlink() and os.path.ismount(path):
        raise UsageError(f"DST {dst!r} is a mount point: it cannot be replaced; choose a folder inside it")
    if path.is_dir() and not path.is_symlink() and not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write DST {dst!r}: the existing folder is not writable, so it cannot be replaced")
    _probe_folder(path.absolute().parent, f"DST {dst!r}")  # the temp folder and the final rename happen there


def check_writable_file(path: str) -> None:
    """Fail before any work when ``path`` could not be written at the end: its folder (or the first existing one
    above it) must be a writable folder, and ``path`` no folder."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{path!r} is a folder, expected a file path")
    _probe_folder(target.absolute().parent, repr(path))


def lock_path(dst: str) -> Path:
    """The lock file a writer of ``dst`` holds: ``.<name>.lock`` beside it."""
    path = Path(dst).expanduser().absolute()
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def sole_writer(dst: str) -> Iterator[None]:
    """Hold DST's lock while writing it; refused (UsageError) at once when another process holds it."""
    lock_file = lock_path(dst)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise UsageError(
            f"DST {dst!r} is being written by another process (it holds {str(lock_file)!r}); wait for it to end, "
            "or choose another folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


__all__ = ["check_destination", "check_not_aliased", "check_writable_file", "lock_path", "sole_writer"]
