"""What the recipes' training loops share and no library does; the loops themselves are in the recipes.

Checkpoints are accelerate's: ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)`` puts each
``accelerator.save_state()`` in OUTPUT_DIR/checkpoints/checkpoint_<i> and keeps the newest N. The loop's counters and
per-epoch history travel in them as a :class:`RunState` (``accelerator.register_for_checkpointing``, saved last, so
a checkpoint without it is one a kill interrupted). Here:

- :func:`make_accelerator`, :func:`create_optimizer_and_scheduler`, :func:`total_training_steps`;
- :class:`RunState`, :func:`checkpoint_names`, :func:`check_checkpoint`, :func:`save_checkpoint`, :func:`resume`;
- :func:`check_finite_loss`, :func:`check_finite_weights`: a diverged run stops before it saves non-finite weights.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_helu.errors import UsageError

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "custom_checkpoint_0.pkl"  # the RunState, the first (and only) object registered for checkpointing
_NAME = re.compile(r"^checkpoint_(\d+)$")


def make_accelerator(args: Any):
    """An Accelerator with the run's precision and accumulation, checkpoints in OUTPUT_DIR/checkpoints (the newest
    ``--save_total_limit`` kept), and a sampler whose order depends on seed + epoch only."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        project_config=ProjectConfiguration(
            project_dir=str(args.output_dir), automatic_checkpoint_naming=True, total_limit=args.save_total_limit
        ),
    )


def create_optimizer_and_scheduler(model: nn.Module, args: Any, num_training_steps: int) -> tuple[Any, Any]:
    """AdamW (no decay on biases and LayerNorm weights) with linear warmup and decay."""
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    warmup = math.ceil(args.warmup_ratio * num_training_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, num_training_steps)


def total_training_steps(
    epochs: int, max_steps: int | None, accumulation: int, batches_per_epoch: int, num_processes: int
) -> int:
    """Optimizer steps each process runs, from the un-prepared dataloader's length (a prepared one is sharded)."""
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total = epochs * math.ceil(steps_per_epoch / num_processes)
    return total if max_steps is None else min(total, max_steps)


def batch_size(batch: Mapping[str, Any]) -> int:
    """The number of examples in a batch (its first tensor's leading size)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 0


class RunState:
    """The loop's counters and per-epoch history, saved in every checkpoint; ``label`` names the checkpoint
    (``step_N`` or ``epoch_N``)."""

    def __init__(self) -> None:
        self.completed_steps = self.epoch = self.batches_in_epoch = self.train_samples = 0
        self.wall_time_s = 0.0
        self.history: list[dict[str, Any]] = []
        self.label = ""
        self._loss_sum, self._loss_count = 0.0, 0
        self._start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        keys = ("completed_steps", "epoch", "batches_in_epoch", "train_samples", "wall_time_s", "history", "label")
        return {key: getattr(self, key) for key in keys} | {"wall_time_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._start = time.perf_counter() - self.wall_time_s

    def elapsed(self) -> float:
        """Training wall time: up to the checkpoint resumed from, plus this process's part."""
        return time.perf_counter() - self._start

    def add_batch(self, loss: torch.Tensor, batch: Mapping[str, Any], num_processes: int) -> None:
        self._loss_sum += loss.detach().float()
        self._loss_count += 1
        self.batches_in_epoch += 1
        self.train_samples += batch_size(batch) * num_processes

    def end_epoch(self, accelerator: Any, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        """Record the epoch (its mean training loss over the batches this process ran) and start the next."""
        loss_sum = torch.as_tensor(self._loss_sum, device=accelerator.device, dtype=torch.float32)
        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(self._loss_count, 1)
        entry = {"epoch": epoch, "step": self.completed_steps, "train_loss": train_loss, **record}
        self.history.append(entry)
        self.epoch, self.batches_in_epoch = epoch + 1, 0
        self._loss_sum, self._loss_count = 0.0, 0
        return entry


def _complete(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (their RunState written), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _read_state(path: Path) -> dict[str, Any]:
    return torch.load(path / STATE_FILE, weights_only=True)


def checkpoint_names(output_dir: str | os.PathLike) -> list[str]:
    """The labels (``step_N``, ``epoch_N``) of the complete checkpoints in OUTPUT_DIR, oldest first."""
    return [_read_state(path)["label"] for path in _complete(output_dir)]


def has_checkpoints(output_dir: str | os.PathLike) -> bool:
    """Whether OUTPUT_DIR/checkpoints holds anything."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    return root.is_dir() and any(root.iterdir())


def check_checkpoint(output_dir: str | os.PathLike, which: str) -> Path:
    """Resolve ``--resume_from_checkpoint`` (a folder, or "latest": the newest complete one) and check that it is
    one, its weights and state readable; before any data or model is loaded."""
    if which == "latest":
        complete = _complete(output_dir)
        if not complete:
            raise UsageError(f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}")
        path = complete[-1]
    else:
        path = Path(which)
    weights = sorted(path.glob("model*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    if not (path / STATE_FILE).is_file() or not weights:
        raise UsageError(f"--resume_from_checkpoint {which!r}: {path} is not a checkpoint folder of a recipe run")
    try:
        state = _read_state(path)
        from safetensors import safe_open

        for file in weights:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
    except Exception as error:  # any failure to read it: a broken checkpoint, the user's input
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        raise UsageError(
            f"--resume_from_checkpoint {which!r}: {path} is not a readable checkpoint ({reason})"
        ) from None
    if not isinstance(state, dict) or "completed_steps" not in state:
        raise UsageError(f"--resume_from_checkpoint {which!r}: {path / STATE_FILE} holds no run state")
    return path


def save_checkpoint(accelerator: Any, model: nn.Module, state: RunState, label: str) -> None:
    """``accelerator.save_state()`` (the next checkpoint_<i>), refused if the weights are no longer finite."""
    check_finite_weights(accelerator, model, state.completed_steps)
    state.label = label
    accelerator.save_state()


def resume(accelerator: Any, output_dir: str | os.PathLike, which: str) -> dict[str, Any]:
    """``accelerator.load_state`` of the checkpoint ``which`` names; later saves number on after the newest one.

    Checkpoint folders a kill left without their RunState are removed first. Returns results.json's
    ``resumed_from``.
    """
    path = check_checkpoint(output_dir, which).resolve()
    root = Path(output_dir) / CHECKPOINTS_DIR
    if accelerator.is_main_process:
        for partial in set(root.iterdir()) - set(_complete(output_dir)):
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    accelerator.wait_for_everyone()
    accelerator.print(f"resuming from {path}")
    accelerator.load_state(str(path))
    numbers = [int(_NAME.match(p.name).group(1)) for p in _complete(output_dir)]
    accelerator.project_configuration.iteration = max(numbers, default=-1) + 1
    return {"path": str(path), "label": _read_state(path)["label"]}


def check_finite_loss(accelerator: Any, loss: torch.Tensor, step: int, lr: float) -> None:
    """Stop a run whose loss is NaN or infinite (on any process), before that loss reaches the weights."""
    bad = torch.tensor(float(not torch.isfinite(loss.detach()).all()), device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item():
        raise UsageError(
            f"the training loss became {loss.item()} at optimizer step {step}: the run diverged (the learning rate "
            f"--lr {lr:g} may be too high, or the data holds non-finite values); nothing was saved after the last "
            "checkpoint"
        )


def check_finite_weights(accelerator: Any, model: nn.Module, step: int) -> None:
    """Refuse to save weights that are NaN or infinite (the last good checkpoint stays the newest)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise UsageError(
            f"after optimizer step {step} {len(bad)} weight tensor(s) are not finite ({bad[0]}, ...): the run "
            "diverged; lower --lr. Nothing was saved after the last checkpoint"
        )


__all__ = [
    "CHECKPOINTS_DIR",
    "RunState",
    "check_checkpoint",
    "check_finite_loss",
    "check_finite_weights",
    "checkpoint_names",
    "create_optimizer_and_scheduler",
    "has_checkpoints",
    "make_accelerator",
    "resume",
    "save_checkpoint",
    "total_training_steps",
]
