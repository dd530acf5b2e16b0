"""What the ``hf-helu`` commands copy from SRC beside the weights they write: tokenizer, processor, subfolders.

Links are never followed out of SRC, so DST never receives a file from elsewhere on the machine:

- a link to a file inside SRC is copied as that file;
- a link to a folder inside SRC is copied as a link, relative, so that it points inside DST (a loop such as
  ``loop -> .`` stays a link and is never walked);
- a link that points outside SRC, or to nothing, and any entry that is no file, folder or link (a FIFO, a socket),
  is refused with a UsageError naming it, before any model loads (:func:`plan_extras`).

A Hub cache snapshot (``models--org--name/snapshots/<rev>``) holds links to its repository's ``blobs`` folder; those
count as inside. Links named like weights or config files are not copied at all: ``save_pretrained`` writes those.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from hf_helu.errors import UsageError

# Files ``save_pretrained`` writes (or that hold weights in another format): never copied from SRC.
_MODEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|.*\.safetensors(\.index\.json)?|.*\.bin(\.index\.json)?|.*\.pt|.*\.pth"
    r"|.*\.h5|.*\.msgpack|.*\.ckpt|.*\.onnx|.*\.ot|.*\.tflite)$"
)
_SKIPPED_DIRS = {".git", "onnx", "openvino", "coreml", ".cache"}


@dataclass(frozen=True)
class Extra:
    """One entry to write under DST: a ``"file"`` copied from ``source``, a ``"folder"``, or a ``"link"`` to
    ``link_to``."""

    relative: Path
    kind: str
    source: Path | None = None
    link_to: str | None = None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def hub_blobs(folder: Path) -> Path | None:
    """The ``blobs`` folder of the Hub cache repository whose snapshot ``folder`` is, else None."""
    snapshots = folder.parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return repo / "blobs"
    return None


def _refuse_link(entry: Path, relative: Path, where: str) -> UsageError:
    return UsageError(
        f"SRC holds the link {str(relative)!r} -> {os.readlink(entry)!r}, which points {where}; hf-helu never follows "
        "links out of SRC: put the file itself in SRC, or remove the link"
    )


def _link(entry: Path, relative: Path, root: Path, blobs: Path | None) -> Extra:
    target = Path(os.path.realpath(entry))
    if not (_within(target, root) or (blobs is not None and _within(target, blobs))):
        raise _refuse_link(entry, relative, "outside SRC")
    if target.is_dir() and _within(target, root):
        return Extra(relative, "link", link_to=os.path.relpath(target, root / relative.parent))
    if not target.is_file():
        raise _refuse_link(entry, relative, "to nothing a model folder holds")
    return Extra(relative, "file", source=target)


def _walk(entry: Path, relative: Path, root: Path, blobs: Path | None, plan: list[Extra]) -> None:
    if entry.is_symlink():
        plan.append(_link(entry, relative, root, blobs))
    elif entry.is_dir():
        plan.append(Extra(relative, "folder"))
        for child in sorted(entry.iterdir()):
            _walk(child, relative / child.name, root, blobs, plan)
    elif entry.is_file():
        plan.append(Extra(relative, "file", source=entry))
    else:
        raise UsageError(f"SRC holds {str(relative)!r}, which is no file, folder or link (a FIFO or socket?)")


def plan_extras(src: Path) -> dict[str, list[Extra]]:
    """What :func:`copy_extras` writes, by top-level name of SRC; raises UsageError for a link it would not follow."""
    root = src.resolve()
    blobs = hub_blobs(root)
    plan: dict[str, list[Extra]] = {}
    for entry in sorted(root.iterdir()):
        real_dir = entry.is_dir() and not entry.is_symlink()
        if entry.name in _SKIPPED_DIRS or entry.name.endswith(".tmp"):
            continue
        if _MODEL_FILE.match(entry.name) and not real_dir:
            continue
        plan[entry.name] = []
        _walk(entry, Path(entry.name), root, blobs, plan[entry.name])
    return plan


def copy_extras(src: Path, dst: Path) -> list[str]:
    """Copy what ``save_pretrained`` did not write (tokenizer, processor, ...) from ``src`` to ``dst``; returns the
    top-level names copied. A name ``dst`` already holds is kept."""
    copied = []
    for name, extras in plan_extras(src).items():
        if (dst / name).exists() or (dst / name).is_symlink():
            continue
        for extra in extras:
            target = dst / extra.relative
            if extra.kind == "folder":
                target.mkdir()
            elif extra.kind == "link":
                os.symlink(extra.link_to, target)
            else:
                shutil.copy2(extra.source, target)
        copied.append(name)
    return copied


__all__ = ["Extra", "copy_extras", "hub_blobs", "plan_extras"]
