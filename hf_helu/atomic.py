"""Atomic file and folder writes: a reader sees the old content or the new, never half of it.

Temp entries carry the writer's pid (``.<name>.<pid>.<random>.tmp``, ``.<name>.old-<pid>``), so the ones a killed
writer left behind can be told from a live writer's and removed (:func:`remove_stale_temps`). What is written honours
the umask, like ``save_pretrained`` (``mkstemp``/``mkdtemp`` alone would give 0600/0700).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# What follows ".<name>." in a temp entry: <pid>.<random>.tmp (a temp file or folder), old-<pid> (a replaced folder),
# and, without a pid, <random>.tmp or tmp (older versions; checkpoints' ".<name>.tmp").
_TEMP_SUFFIX = re.compile(r"^(?:(?P<pid>\d+)\.[^.]+\.tmp|old-(?P<old_pid>\d+)|[^.]+\.tmp|tmp)$")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _temp_of(entry_name: str, names: Iterable[str] | None) -> tuple[str, bool, int | None] | None:
    """(target name, is a replaced folder, writer pid or None) of a temp entry's name; None if it is no temp entry."""
    if names is None:  # every split ".<name>.<suffix>" of the entry's name
        names = [entry_name[1:i] for i in range(2, len(entry_name)) if entry_name[i] == "."]
    for name in names:
        prefix = f".{name}."
        match = _TEMP_SUFFIX.match(entry_name[len(prefix) :]) if entry_name.startswith(prefix) else None
        if match is not None:
            pid = match["pid"] or match["old_pid"]
            return name, match["old_pid"] is not None, int(pid) if pid else None
    return None


def remove_stale_temps(
    folder: str | os.PathLike, names: Iterable[str] | None = None, any_pid: bool = False
) -> list[Path]:
    """Remove from ``folder`` the temp entries of writers that are gone (killed mid-write); returns what was removed.

    ``names``: only the temp entries of these targets. ``any_pid``: also those of live pids and those with no pid
    (older versions), for a folder no other writer can be using (a locked run folder). A replaced folder whose
    target is missing (killed between the two renames) is renamed back instead: it is the only copy.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in sorted(folder.iterdir()):
        temp = _temp_of(entry.name, names)
        if temp is None:
            continue
        name, replaced, pid = temp
        if not (any_pid or (pid is not None and pid != os.getpid() and not pid_alive(pid))):
            continue
        if replaced and not (folder / name).exists():
            os.replace(entry, folder / name)
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder, then rename over it."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"atomic_write_bytes expects bytes, got {type(data).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, [path.name])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """``json.dump`` of ``data`` (indented, keys in insertion order) written atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path``, on error it is removed.

    Without ``overwrite``, an existing non-empty ``path`` is an error, raised before any work and again at the
    rename (another writer may have made it meanwhile: its folder is kept). A link at ``path`` is replaced by the
    folder, never followed. Temp folders of ``path`` left by killed writers are removed first.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, [path.name])
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not overwrite and path.exists() and (not path.is_dir() or any(path.iterdir())):
        shutil.rmtree(tmp, ignore_errors=True)  # another writer made it meanwhile: theirs stays
        raise FileExistsError(f"{path} appeared while it was being written (another writer?); it is left as it is")
    try:
        if path.is_symlink() or path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the old folder goes back: the call changes nothing
                raise
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no hidden temp copy stays behind
        raise


def _remove(path: Path) -> None:
    """Remove a folder tree, or a link (never what it points to); nothing if absent."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "pid_alive",
    "remove_stale_temps",
]
