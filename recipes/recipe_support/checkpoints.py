"""Checkpoints of a run: OUTPUT_DIR/checkpoints/{step_N,epoch_N}, each complete or absent.

A checkpoint is ``accelerator.save_state`` (model, optimizer, scheduler, RNG states) plus ``trainer_state.json``
(the loop's counters and the per-epoch history), written into a hidden temp folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from hf_helu.atomic import atomic_write_json
from hf_helu.errors import UsageError

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


def _checkpoint_step(path: Path) -> int:
    state = json.loads((path / STATE_FILE).read_text())
    return int(state["completed_steps"])


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if not p.name.startswith(".") and (p / STATE_FILE).is_file()]


def _age(path: Path) -> tuple[int, float]:
    """Sort key: steps, then save time (a step_N and the epoch_M saved at the same step)."""
    return _checkpoint_step(path), path.stat().st_mtime


def checkpoint_names(output_dir: str | os.PathLike) -> list[str]:
    """Complete checkpoints in OUTPUT_DIR/checkpoints, oldest first (for tests and tooling)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    return [p.name for p in sorted(_complete(root), key=_age)]


def has_checkpoints(output_dir: str | os.PathLike) -> bool:
    """Whether OUTPUT_DIR/checkpoints holds anything but hidden (temp) entries."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    return root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir())


def find_checkpoint(output_dir: str | os.PathLike, which: str) -> Path:
    """Resolve --resume_from_checkpoint: a folder, or "latest" = the complete checkpoint with the most steps."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise UsageError(f"--resume_from_checkpoint {which!r} is not a checkpoint folder (no {STATE_FILE})")
        return path
    root = Path(output_dir) / CHECKPOINTS_DIR
    candidates = _complete(root)
    if not candidates:
        raise UsageError(f"--resume_from_checkpoint latest: no checkpoint in {root}")
    return max(candidates, key=_age)


def save_checkpoint(accelerator: Any, output_dir: Path, name: str, state: dict[str, Any]) -> Path:
    """``accelerator.save_state`` into a temp folder, then rename: a checkpoint folder is complete or absent."""
    root = output_dir / CHECKPOINTS_DIR
    final, tmp = root / name, root / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(accelerator: Any, output_dir: Path, keep: int | None) -> None:
    """Keep only the newest ``keep`` checkpoints (all of them when None)."""
    if not keep or not accelerator.is_main_process:
        return
    for old in checkpoint_names(output_dir)[:-keep]:
        shutil.rmtree(output_dir / CHECKPOINTS_DIR / old, ignore_errors=True)


def load_checkpoint(accelerator: Any, output_dir: Path, which: str) -> tuple[Path, dict[str, Any]]:
    """``accelerator.load_state`` of the checkpoint ``which`` resolves to; returns it and its trainer state."""
    path = find_checkpoint(output_dir, which)
    accelerator.print(f"resuming from {path}")
    accelerator.load_state(str(path))
    return path, json.loads((path / STATE_FILE).read_text())


__all__ = [
    "CHECKPOINTS_DIR",
    "STATE_FILE",
    "checkpoint_names",
    "find_checkpoint",
    "has_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]
