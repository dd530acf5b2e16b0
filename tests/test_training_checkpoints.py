"""Checkpoint folders (recipe_support.checkpoints): ordering, "latest", pruning. (Refusing to start over a run:
test_training_output_dir.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from recipe_support.checkpoints import (
    CHECKPOINTS_DIR,
    STATE_FILE,
    checkpoint_names,
    find_checkpoint,
    prune_checkpoints,
)

from hf_helu.errors import UsageError


class OneProcess:
    """The few Accelerator members the checkpoint functions use, for one process."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def fake_checkpoint(output_dir: Path, name: str, steps: int) -> Path:
    path = output_dir / CHECKPOINTS_DIR / name
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps({"completed_steps": steps}))
    return path


def test_names_by_step_and_latest(tmp_path):
    for name, steps in (("epoch_1", 5), ("step_2", 2), ("step_6", 6), ("step_4", 4)):
        fake_checkpoint(tmp_path, name, steps)
    (tmp_path / CHECKPOINTS_DIR / ".step_8.tmp").mkdir()  # an unfinished save
    (tmp_path / CHECKPOINTS_DIR / "broken").mkdir()  # no trainer state
    assert checkpoint_names(tmp_path) == ["step_2", "step_4", "epoch_1", "step_6"]
    assert find_checkpoint(tmp_path, "latest") == tmp_path / CHECKPOINTS_DIR / "step_6"
    assert find_checkpoint(tmp_path, str(tmp_path / CHECKPOINTS_DIR / "step_2")).name == "step_2"
    with pytest.raises(UsageError, match="is not a checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path / CHECKPOINTS_DIR / "broken"))
    prune_checkpoints(OneProcess(), tmp_path, keep=2)
    assert checkpoint_names(tmp_path) == ["epoch_1", "step_6"]


def test_no_checkpoint_yet(tmp_path):
    assert checkpoint_names(tmp_path) == []
    with pytest.raises(UsageError, match="latest: no checkpoint in"):
        find_checkpoint(tmp_path, "latest")
