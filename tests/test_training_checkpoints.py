"""Checkpoints of a recipe run (recipe_support.training on accelerate's automatic checkpoint naming): labels in
save order, the newest N kept, "latest" is the newest complete one, a resume numbers on after it, and a folder that
is not a readable checkpoint is refused naming it. (Refusing to start over a run: test_training_output_dir.)"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from recipe_support.training import (
    CHECKPOINTS_DIR,
    RunState,
    check_checkpoint,
    checkpoint_names,
    make_accelerator,
    resume,
    save_checkpoint,
)

from hf_helu.errors import UsageError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def flags(out: Path, keep: int | None) -> argparse.Namespace:
    return argparse.Namespace(
        output_dir=out, save_total_limit=keep, mixed_precision="no", gradient_accumulation_steps=1, seed=0
    )


def run(out: Path, keep: int | None = None) -> tuple:
    accelerator = make_accelerator(flags(out, keep))
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    state = RunState()
    accelerator.register_for_checkpointing(state)
    return accelerator, model, state


def test_labels_in_save_order_the_newest_kept_and_latest(tmp_path):
    accelerator, model, state = run(tmp_path, keep=3)
    for steps, label in ((2, "step_2"), (4, "step_4"), (5, "epoch_1"), (6, "step_6")):
        state.completed_steps = steps
        save_checkpoint(accelerator, model, state, label)
    assert checkpoint_names(tmp_path) == ["step_4", "epoch_1", "step_6"]  # total_limit 3: step_2 went
    root = tmp_path / CHECKPOINTS_DIR
    assert check_checkpoint(tmp_path, "latest") == root / "checkpoint_3"
    (root / "checkpoint_4").mkdir()  # a save a kill interrupted: no run state, never "latest"
    (root / "checkpoint_4" / "model.safetensors").write_bytes(b"partial")
    assert check_checkpoint(tmp_path, "latest") == root / "checkpoint_3"

    with torch.no_grad():
        model.weight.add_(1.0)
    saved = resume(accelerator, tmp_path, str(root / "checkpoint_2"))  # an older one, by folder
    assert saved["label"] == "epoch_1" and state.completed_steps == 5
    assert not (root / "checkpoint_4").exists()  # the interrupted save is removed
    state.completed_steps = 7
    save_checkpoint(accelerator, model, state, "step_7")  # numbered after the newest: nothing overwritten
    assert checkpoint_names(tmp_path) == ["epoch_1", "step_6", "step_7"]


def test_no_checkpoint_and_folders_that_are_not_checkpoints(tmp_path):
    with pytest.raises(UsageError, match="latest: no checkpoint in"):
        check_checkpoint(tmp_path, "latest")
    accelerator, model, state = run(tmp_path / "run")
    save_checkpoint(accelerator, model, state, "epoch_1")
    good = tmp_path / "run" / CHECKPOINTS_DIR / "checkpoint_0"
    assert check_checkpoint(tmp_path, str(good)) == good
    garbage = tmp_path / "garbage"
    shutil.copytree(good, garbage)
    for file in garbage.iterdir():
        file.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(
        UsageError, match=rf"--resume_from_checkpoint '{garbage}': {garbage} is not a readable checkpoint"
    ):
        check_checkpoint(tmp_path, str(garbage))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=rf"{empty} is not a checkpoint folder"):
        check_checkpoint(tmp_path, str(empty))


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    accelerator, model, state = run(tmp_path)
    save_checkpoint(accelerator, model, state, "step_1")
    with torch.no_grad():
        model.bias[0] = float("nan")
    state.completed_steps = 2
    with pytest.raises(UsageError, match=r"after optimizer step 2 1 weight tensor\(s\) are not finite \(bias"):
        save_checkpoint(accelerator, model, state, "step_2")
    assert checkpoint_names(tmp_path) == ["step_1"]
