"""Paths and builders shared by the speech test modules (imported as ``speech_helpers``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import FSDD_DIR

FSDD = FSDD_DIR
RECORDINGS = FSDD / "recordings"
needs_fsdd = pytest.mark.skipif(not RECORDINGS.is_dir(), reason=f"FSDD not found at {RECORDINGS}")


def fsdd_files(names: list[str]) -> list[Path]:
    return [RECORDINGS / name for name in names]


def write_audiofolder(root: Path, layout: dict[str, list[str]]) -> None:
    """``{"train/3": [fsdd names]}``: copies real FSDD recordings into label folders."""
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(RECORDINGS / name, root / folder / name)
