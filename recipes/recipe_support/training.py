"""The one training loop of the encoder recipes, and what every recipe's loop shares: the accelerator, optimizer and
schedule, checkpoints and resume, the finite-loss guard, trackers and the progress bar.

Checkpoints are accelerate's ``save_state``/``load_state`` in OUTPUT_DIR/checkpoints/checkpoint_<i>, written crash-safe:
:func:`save_checkpoint` saves into ``partial_checkpoint_<i>``, renames it to ``checkpoint_<i>`` once complete, and
only then removes the checkpoints beyond ``--save_total_limit`` (accelerate's own ``total_limit`` deletes the old one
before writing the new one, so a kill inside that save leaves nothing to resume from). The loop's counters and
per-epoch history travel in them as a :class:`RunState` (``accelerator.register_for_checkpointing``).
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
LOGS_DIR = "logs"  # the trackers' files (--with_tracking), OUTPUT_DIR/logs/<recipe>
STATE_FILE = "custom_checkpoint_0.pkl"  # the RunState, the first (and only) object registered for checkpointing
PARTIAL = "partial_"
_NAME = re.compile(r"^checkpoint_(\d+)$")


def make_accelerator(args: Any):
    """An Accelerator with the run's precision, accumulation and trackers (``--with_tracking --report_to``),
    project folder OUTPUT_DIR, and a sampler whose order depends on seed + epoch only. ``--no_progress`` also turns
    off transformers' bars (loading, and hf_helu's calibration)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
    from transformers.utils import logging

    from recipe_support.args import trackers

    if getattr(args, "no_progress", False):
        logging.disable_progress_bar()

    output_dir = str(args.output_dir)
    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers(args, os.path.join(output_dir, LOGS_DIR)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        project_config=ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, LOGS_DIR)),
    )


def start_tracking(accelerator: Any, args: Any, project: str) -> None:
    """``accelerator.init_trackers`` with the run's scalar flags as hyperparameters (with ``--with_tracking``)."""
    if getattr(args, "with_tracking", False):
        scalars = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool) and k != "hub_token"}
        accelerator.init_trackers(project, config=scalars)


def create_optimizer_and_scheduler(model: nn.Module, args: Any, total_steps: int, num_processes: int) -> tuple:
    """AdamW (no decay on biases and LayerNorm weights) and ``transformers.get_scheduler(--lr_scheduler_type)`` with
    ``--num_warmup_steps`` (default: ``--warmup_ratio`` of ``total_steps``, the optimizer steps of one process)."""
    from transformers import get_scheduler

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    warmup = args.num_warmup_steps if args.num_warmup_steps is not None else math.ceil(args.warmup_ratio * total_steps)
    # The prepared scheduler steps once per process per optimizer step: schedule over all of them.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, warmup * num_processes, total_steps * num_processes)
    return optimizer, scheduler


def total_training_steps(args: Any, batches_per_epoch: int, num_processes: int) -> int:
    """Optimizer steps each process runs, from the un-prepared dataloader's length (a prepared one is sharded)."""
    steps_per_epoch = math.ceil(math.ceil(batches_per_epoch / num_processes) / args.gradient_accumulation_steps)
    total = args.num_train_epochs * steps_per_epoch
    return total if args.max_train_steps is None else min(total, args.max_train_steps)


class RunState:
    """The loop's counters and per-epoch history, saved in every checkpoint; ``label`` names the checkpoint
    (``step_N`` or ``epoch_N``)."""

    def __init__(self) -> None:
        self.completed_steps = self.epoch = self.batches_in_epoch = self.train_samples = self.train_tokens = 0
        self.wall_time_s = 0.0
        self.history: list[dict[str, Any]] = []
        self.label = ""
        self._loss_sum, self._loss_count = 0.0, 0
        self._start = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        keys = ("completed_steps", "epoch", "batches_in_epoch", "train_samples", "train_tokens", "history", "label")
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
        size = next((len(v) for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0), 0)
        self.train_samples += size * num_processes
        if isinstance(batch.get("input_ids"), torch.Tensor):
            self.train_tokens += batch["input_ids"].numel() * num_processes

    def mean_loss(self, accelerator: Any) -> float:
        """The mean training loss over the batches of this epoch (all processes)."""
        loss_sum = torch.as_tensor(self._loss_sum, device=accelerator.device, dtype=torch.float32)
        return accelerator.reduce(loss_sum, reduction="mean").item() / max(self._loss_count, 1)

    def end_epoch(self, accelerator: Any, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        """Record the epoch (its mean training loss) and start the next."""
        entry = {"epoch": epoch, "step": self.completed_steps, "train_loss": self.mean_loss(accelerator), **record}
        self.history.append(entry)
        self.epoch, self.batches_in_epoch = epoch + 1, 0
        self._loss_sum, self._loss_count = 0.0, 0
        return entry

    def epoch_batches(self, accelerator: Any, dataloader: Any, epoch: int) -> Any:
        """The prepared dataloader's batches of ``epoch`` (the seedable sampler's order depends on seed + epoch), a
        resumed epoch skipping those it has seen."""
        skip = self.batches_in_epoch
        batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        batches.set_epoch(epoch)
        return batches


def progress_bar(args: Any, accelerator: Any, total: int, initial: int = 0, desc: str = "train", iterable=None):
    """A tqdm bar on the local main process (none with ``--no_progress``); over ``iterable`` if given."""
    from tqdm.auto import tqdm

    disable = getattr(args, "no_progress", False) or not accelerator.is_local_main_process
    return tqdm(iterable, total=total, initial=initial, disable=disable, desc=desc, leave=iterable is None)


def with_progress(args: Any, accelerator: Any, dataloaders: dict[str, Any]) -> dict[str, Any]:
    """``dataloaders`` whose iteration shows an evaluation bar per split."""
    return {
        split: progress_bar(args, accelerator, len(dl), desc=f"eval {split}", iterable=dl)
        for split, dl in dataloaders.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _complete(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed from partial_, their RunState written), oldest first."""
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


def save_checkpoint(accelerator: Any, model: nn.Module, state: RunState, label: str, keep: int | None) -> Path:
    """``accelerator.save_state`` into ``partial_checkpoint_<i>``, renamed ``checkpoint_<i>`` when complete; then the
    checkpoints beyond the newest ``keep`` are removed. Refused if the weights are no longer finite."""
    check_finite_weights(accelerator, model, state.completed_steps)
    state.label = label
    root = Path(accelerator.project_dir) / CHECKPOINTS_DIR
    name = f"checkpoint_{accelerator.save_iteration}"
    accelerator.save_state(str(root / (PARTIAL + name)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (root / (PARTIAL + name)).rename(root / name)
        for old in _complete(accelerator.project_dir)[: -keep if keep else 0]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return root / name


def resume(accelerator: Any, output_dir: str | os.PathLike, which: str) -> dict[str, Any]:
    """``accelerator.load_state`` of the checkpoint ``which`` names; later saves number on after the newest one.

    What a kill left half-written (partial_ folders) is removed first. Returns results.json's ``resumed_from``.
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


# ----------------------------------------------------------------------------------------------------------------
# The finite-loss guard
# ----------------------------------------------------------------------------------------------------------------


def check_finite_loss(accelerator: Any, loss: torch.Tensor, step: int, lr: float) -> None:
    """Stop a run whose loss is NaN or infinite (on any process), before that loss reaches the weights."""
    bad = torch.tensor(float(not torch.isfinite(loss.detach()).all()), device=accelerator.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item():
        raise UsageError(
            f"the training loss became {loss.item()} at optimizer step {step}: the run diverged (the learning rate "
            f"--learning_rate {lr:g} may be too high, or the data holds non-finite values); nothing was saved after "
            "the last checkpoint"
        )


def check_finite_weights(accelerator: Any, model: nn.Module, step: int) -> None:
    """Refuse to save weights that are NaN or infinite (the last good checkpoint stays the newest)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise UsageError(
            f"after optimizer step {step} {len(bad)} weight tensor(s) are not finite ({bad[0]}, ...): the run "
            "diverged; lower --learning_rate. Nothing was saved after the last checkpoint"
        )


def start_training(args: Any, accelerator: Any, results: dict, annealer: Any, total_steps: int) -> tuple:
    """The loop's :class:`RunState` (registered for checkpointing, restored by ``--resume_from_checkpoint``, which
    results.json records as ``resumed_from``), the annealer set to its step, and the progress bar."""
    state = RunState()
    accelerator.register_for_checkpointing(state)
    if args.resume_from_checkpoint:
        results["resumed_from"] = resume(accelerator, args.output_dir, args.resume_from_checkpoint)
    if annealer is not None:
        annealer.on_step(state.completed_steps, total_steps)
    return state, progress_bar(args, accelerator, total_steps, state.completed_steps)


def step(args: Any, accelerator: Any, model: nn.Module, loss, optimizer: Any, scheduler: Any, state: RunState) -> None:
    """Inside ``accelerator.accumulate``: the finite-loss guard, backward, clipping (``--max_grad_norm``) and the
    optimizer and scheduler steps."""
    check_finite_loss(accelerator, loss, state.completed_steps + 1, args.learning_rate)
    accelerator.backward(loss)
    if accelerator.sync_gradients and args.max_grad_norm:
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def end_step(args: Any, accelerator: Any, model: nn.Module, state: RunState, progress: Any, loss, scheduler) -> None:
    """After an optimizer step: count it, show its loss on the bar, log it (--with_tracking), checkpoint every
    --checkpointing_steps steps."""
    state.completed_steps += 1
    progress.update(1)
    progress.set_postfix(loss=f"{loss.item():.4g}")
    if args.with_tracking:
        accelerator.log({"train_loss": loss.item(), "lr": scheduler.get_last_lr()[0]}, state.completed_steps)
    if args.checkpointing_steps != "epoch" and state.completed_steps % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, model, state, f"step_{state.completed_steps}", args.save_total_limit)


# ----------------------------------------------------------------------------------------------------------------
# The encoder recipes' loop
# ----------------------------------------------------------------------------------------------------------------


def train(args, accelerator, model, train_dataloader, eval_dataloaders, evaluator, results, *, annealer, compute_loss):
    """The training loop of run_glue, run_speech and run_mlm: optimizer and schedule, resume, epochs of steps, an
    evaluation and a checkpoint per epoch. Returns the prepared model and eval dataloaders, and the RunState."""
    from recipe_support.results import log_metrics, write_results

    total_steps = total_training_steps(args, len(train_dataloader), accelerator.num_processes)
    optimizer, lr_scheduler = create_optimizer_and_scheduler(model, args, total_steps, accelerator.num_processes)
    names = list(eval_dataloaders)
    model, optimizer, train_dataloader, lr_scheduler, *loaders = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler, *eval_dataloaders.values()
    )
    eval_dataloaders = dict(zip(names, loaders, strict=True))
    state, progress = start_training(args, accelerator, results, annealer, total_steps)
    results["epochs"] = state.history
    for epoch in range(state.epoch, args.num_train_epochs):
        if state.completed_steps >= total_steps:
            break
        model.train()
        for batch in state.epoch_batches(accelerator, train_dataloader, epoch):
            with accelerator.accumulate(model):
                loss = compute_loss(model, batch) if compute_loss is not None else model(**batch).loss
                step(args, accelerator, model, loss, optimizer, lr_scheduler, state)
            state.add_batch(loss, batch, accelerator.num_processes)
            if accelerator.sync_gradients:
                end_step(args, accelerator, model, state, progress, loss, lr_scheduler)
                if annealer is not None:
                    annealer.on_step(state.completed_steps, total_steps)
                if state.completed_steps >= total_steps:
                    break
        metrics, dead = evaluator(model, with_progress(args, accelerator, eval_dataloaders))
        log_metrics(accelerator, f"epoch {epoch}", metrics)
        entry = state.end_epoch(
            accelerator, epoch, {"lr": lr_scheduler.get_last_lr()[0], "eval": metrics, "dead_units": dead}
        )
        if args.with_tracking:
            flat = {f"eval/{split}/{k}": v for split, m in metrics.items() for k, v in m.items()}
            accelerator.log({"epoch_train_loss": entry["train_loss"], **flat}, state.completed_steps)
        results["epochs"] = state.history
        write_results(accelerator, Path(args.output_dir), results)
        save_checkpoint(accelerator, model, state, f"epoch_{epoch + 1}", args.save_total_limit)
    progress.close()
    check_finite_weights(accelerator, model, state.completed_steps)  # what finish_training saves is finite
    return model, eval_dataloaders, state


__all__ = [
    "CHECKPOINTS_DIR",
    "LOGS_DIR",
    "RunState",
    "check_checkpoint",
    "check_finite_loss",
    "check_finite_weights",
    "checkpoint_names",
    "create_optimizer_and_scheduler",
    "end_step",
    "has_checkpoints",
    "make_accelerator",
    "progress_bar",
    "resume",
    "save_checkpoint",
    "start_tracking",
    "start_training",
    "step",
    "total_training_steps",
    "train",
    "with_progress",
]
