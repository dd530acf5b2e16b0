"""Checkpoints of a recipe run (recipe_support.training on accelerate's save_state/load_state): labels in save
order, the newest N kept, and only once the new one is complete (a kill inside a save keeps the last complete one),
"latest" is the newest complete one, a resume numbers on after it, and a folder that is not a readable checkpoint is
refused naming it. (Refusing to start over a run: test_training_output_dir.)"""

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


def flags(out: Path) -> argparse.Namespace:
    return argparse.Namespace(output_dir=out, mixed_precision="no", gradient_accumulation_steps=1, seed=0)


def run(out: Path, keep: int | None = None) -> tuple:
    accelerator = make_accelerator(flags(out))
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    state = RunState()
    accelerator.register_for_checkpointing(state)
    return accelerator, model, state


def test_labels_in_save_order_the_newest_kept_and_latest(tmp_path):
    accelerator, model, state = run(tmp_path, keep=3)
    for steps, label in ((2, "step_2"), (4, "step_4"), (5, "epoch_1"), (6, "step_6")):
        state.completed_steps = steps
        save_checkpoint(accelerator, model, state, label, keep=3)
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
    save_checkpoint(accelerator, model, state, "step_7", keep=3)  # numbered after the newest: nothing overwritten
    assert checkpoint_names(tmp_path) == ["epoch_1", "step_6", "step_7"]


def test_a_kill_inside_a_save_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    """keep=1: a save that dies after writing the weights (before the run state) leaves the previous checkpoint
    complete, as the newest, with its weights; resuming removes the half-written one and loads the complete one."""
    import accelerate.accelerator

    accelerator, model, state = run(tmp_path, keep=1)
    state.completed_steps = 1
    save_checkpoint(accelerator, model, state, "step_1", keep=1)
    saved = model.weight.detach().clone()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process ends here, as under a kill, inside save_state

    monkeypatch.setattr(accelerate.accelerator, "save_custom_state", killed)
    with torch.no_grad():
        model.weight.add_(1.0)
    state.completed_steps = 2
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, model, state, "step_2", keep=1)
    monkeypatch.undo()
    root = tmp_path / CHECKPOINTS_DIR
    assert (root / "partial_checkpoint_1" / "model.safetensors").is_file()  # the weights of step 2 were written
    assert checkpoint_names(tmp_path) == ["step_1"] and check_checkpoint(tmp_path, "latest") == root / "checkpoint_0"
    assert resume(accelerator, tmp_path, "latest")["label"] == "step_1" and state.completed_steps == 1
    assert torch.equal(model.weight, saved) and sorted(p.name for p in root.iterdir()) == ["checkpoint_0"]


def test_no_checkpoint_and_folders_that_are_not_checkpoints(tmp_path):
    with pytest.raises(UsageError, match="latest: no checkpoint in"):
        check_checkpoint(tmp_path, "latest")
    accelerator, model, state = run(tmp_path / "run")
    save_checkpoint(accelerator, model, state, "epoch_1", keep=None)
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
    save_checkpoint(accelerator, model, state, "step_1", keep=None)
    with torch.no_grad():
        model.bias[0] = float("nan")
    state.completed_steps = 2
    with pytest.raises(UsageError, match=r"after optimizer step 2 1 weight tensor\(s\) are not finite \(bias"):
        save_checkpoint(accelerator, model, state, "step_2", keep=None)
    assert checkpoint_names(tmp_path) == ["step_1"]
