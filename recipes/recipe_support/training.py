"""The recipes' training loop: the accelerator, optimizer and schedule, the finite-loss guard, trackers, progress
bars, and checkpoints (accelerate's ``save_state``/``load_state`` into ``partial_checkpoint_<i>``, renamed
``checkpoint_<i>`` once complete; only then are those beyond ``--save_total_limit`` removed: accelerate's own
``total_limit`` deletes before it writes, so a kill inside that save would leave nothing to resume)."""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_helu.errors import UsageError

CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"  # the trackers' files (--with_tracking)
STATE_FILE = "custom_checkpoint_0.pkl"  # the RunState, the only object registered for checkpointing
_NAME = re.compile(r"^checkpoint_(\d+)$")


def make_accelerator(args: Any):
    """An Accelerator with the run's precision, accumulation, trackers and project folder, and a sampler whose order
    depends on seed + epoch only; ``--no_progress`` also turns off transformers' bars."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
    from transformers.utils import logging

    from recipe_support.args import trackers

    if getattr(args, "no_progress", False):
        logging.disable_progress_bar()
    logs = os.path.join(str(args.output_dir), LOGS_DIR)
    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers(args, logs),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        project_config=ProjectConfiguration(project_dir=str(args.output_dir), logging_dir=logs),
    )


def start_tracking(accelerator: Any, args: Any, project: str) -> None:
    """``accelerator.init_trackers`` with the run's scalar flags as hyperparameters (with ``--with_tracking``)."""
    if getattr(args, "with_tracking", False):
        scalars = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool) and k != "hub_token"}
        accelerator.init_trackers(project, config=scalars)


def create_optimizer_and_scheduler(model: nn.Module, args: Any, total_steps: int, num_processes: int) -> tuple:
    """AdamW (no decay on biases and norms) and ``transformers.get_scheduler`` over ``total_steps``; the warmup is
    ``--num_warmup_steps`` or ``--warmup_ratio`` of the steps."""
    from transformers import get_scheduler

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in params if p.ndim < 2 or "norm" in n.lower()]
    decay = [p for n, p in params if not (p.ndim < 2 or "norm" in n.lower())]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    warmup = args.num_warmup_steps if args.num_warmup_steps is not None else math.ceil(args.warmup_ratio * total_steps)
    # The prepared scheduler steps once per process per optimizer step: schedule over all of them.
    return optimizer, get_scheduler(
        args.lr_scheduler_type, optimizer, warmup * num_processes, total_steps * num_processes
    )


def total_training_steps(args: Any, batches_per_epoch: int, num_processes: int) -> int:
    """Optimizer steps each process runs, from the un-prepared dataloader's length (a prepared one is sharded)."""
    per_epoch = math.ceil(math.ceil(batches_per_epoch / num_processes) / args.gradient_accumulation_steps)
    return min(args.num_train_epochs * per_epoch, args.max_train_steps or math.inf)


class RunState:
    """The loop's counters and per-epoch history, saved in every checkpoint; ``label`` names the checkpoint."""

    def __init__(self) -> None:
        self.completed_steps = self.epoch = self.batches_in_epoch = self.train_samples = self.train_tokens = 0
        self.history: list[dict[str, Any]] = []
        self.label = ""
        self._loss_sum, self._loss_count, self._start = 0.0, 0, time.perf_counter()

    def state_dict(self) -> dict[str, Any]:  # the public attributes (private ones restart with the process)
        return {k: v for k, v in vars(self).items() if not k.startswith("_")} | {"wall_time_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update((k, v) for k, v in state.items() if k != "wall_time_s")
        self._start = time.perf_counter() - state["wall_time_s"]

    def elapsed(self) -> float:  # training wall time, that before the checkpoint resumed from included
        return time.perf_counter() - self._start

    def add_batch(self, loss: torch.Tensor, batch: dict, num_processes: int) -> None:
        self._loss_sum += loss.detach().float()
        self._loss_count += 1
        self.batches_in_epoch += 1
        self.train_samples += next((len(v) for v in batch.values() if torch.is_tensor(v) and v.ndim), 0) * num_processes
        if torch.is_tensor(batch.get("input_ids")):
            self.train_tokens += batch["input_ids"].numel() * num_processes

    def mean_loss(self, accelerator: Any) -> float:  # over this epoch's batches and all processes
        loss_sum = torch.as_tensor(self._loss_sum, device=accelerator.device, dtype=torch.float32)
        return accelerator.reduce(loss_sum, reduction="mean").item() / max(self._loss_count, 1)

    def end_epoch(self, accelerator: Any, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        entry = {"epoch": epoch, "step": self.completed_steps, "train_loss": self.mean_loss(accelerator), **record}
        self.history.append(entry)
        self.epoch, self.batches_in_epoch, self._loss_sum, self._loss_count = epoch + 1, 0, 0.0, 0
        return entry

    def epoch_batches(self, accelerator: Any, dataloader: Any, epoch: int) -> Any:  # a resumed epoch skips some
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
    """An evaluation bar per split."""
    return {k: progress_bar(args, accelerator, len(v), desc=f"eval {k}", iterable=v) for k, v in dataloaders.items()}


def _complete(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (renamed from partial_, their RunState written), oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def checkpoint_names(output_dir: str | os.PathLike) -> list[str]:
    """The labels (``step_N``, ``epoch_N``) of the complete checkpoints in OUTPUT_DIR, oldest first."""
    return [torch.load(path / STATE_FILE, weights_only=True)["label"] for path in _complete(output_dir)]


def check_checkpoint(output_dir: str | os.PathLike, which: str) -> Path:
    """``--resume_from_checkpoint`` (a folder, or "latest": the newest complete one), checked readable before any
    data or model is loaded."""
    from safetensors import safe_open

    complete = _complete(output_dir) if which == "latest" else [Path(which)]
    if not complete:
        raise UsageError(f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}")
    path = complete[-1]
    weights = sorted(path.glob("model*.safetensors"))
    if not (path / STATE_FILE).is_file() or not weights:
        raise UsageError(f"--resume_from_checkpoint {which!r}: {path} is not a checkpoint folder of a recipe run")
    try:
        torch.load(path / STATE_FILE, weights_only=True)["completed_steps"]
        for file in weights:
            safe_open(str(file), framework="pt").keys()
    except Exception as error:  # any failure to read it: a broken checkpoint, the user's input
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        raise UsageError(
            f"--resume_from_checkpoint {which!r}: {path} is not a readable checkpoint ({reason})"
        ) from None
    return path


def save_checkpoint(accelerator: Any, model: nn.Module, state: RunState, label: str, keep: int | None) -> Path:
    """``accelerator.save_state`` into ``partial_checkpoint_<i>``, renamed ``checkpoint_<i>`` when complete, then the
    checkpoints beyond the newest ``keep`` removed. Refused if the weights are no longer finite."""
    check_finite_weights(accelerator, model, state.completed_steps)
    state.label = label
    root, name = Path(accelerator.project_dir) / CHECKPOINTS_DIR, f"checkpoint_{accelerator.save_iteration}"
    accelerator.save_state(str(root / f"partial_{name}"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (root / f"partial_{name}").rename(root / name)
        for old in _complete(accelerator.project_dir)[: -keep if keep else 0]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return root / name


def resume(accelerator: Any, output_dir: str | os.PathLike, which: str) -> dict[str, Any]:
    """Remove what a kill left half-written, ``accelerator.load_state`` the checkpoint ``which`` names, and number
    later saves after the newest one. Returns results.json's ``resumed_from``."""
    path = check_checkpoint(output_dir, which).resolve()
    complete = _complete(output_dir)
    if accelerator.is_main_process:
        for partial in set((Path(output_dir) / CHECKPOINTS_DIR).iterdir()) - set(complete):
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    accelerator.wait_for_everyone()
    accelerator.print(f"resuming from {path}")
    accelerator.load_state(str(path))
    accelerator.project_configuration.iteration = max((int(_NAME.match(p.name)[1]) for p in complete), default=-1) + 1
    return {"path": str(path), "label": torch.load(path / STATE_FILE, weights_only=True)["label"]}


def check_finite_loss(accelerator: Any, loss: torch.Tensor, step: int, lr: float) -> None:
    """Stop a run whose loss is NaN or infinite (on any process), before that loss reaches the weights."""
    bad = torch.tensor(float(not torch.isfinite(loss.detach()).all()), device=accelerator.device)
    if accelerator.reduce(bad, reduction="sum").item():
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


def train(args, accelerator, model, train_dataloader, eval_dataloaders, evaluator, results, *, annealer, compute_loss):
    """Every training recipe's loop (accelerate's nlp_example plus resume, checkpoints, the finite-loss guard):
    epochs of steps (``annealer.on_step(done, total)`` before the first and after each), then an evaluation (with an
    ``evaluator``), results.json and a checkpoint. Returns the prepared model and eval loaders, and the RunState."""
    total_steps = total_training_steps(args, len(train_dataloader), accelerator.num_processes)
    optimizer, lr_scheduler = create_optimizer_and_scheduler(model, args, total_steps, accelerator.num_processes)
    model, optimizer, train_dataloader, lr_scheduler, *loaders = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler, *eval_dataloaders.values()
    )
    eval_dataloaders = dict(zip(eval_dataloaders, loaders, strict=True))
    state = RunState()
    accelerator.register_for_checkpointing(state)
    if args.resume_from_checkpoint:
        results["resumed_from"] = resume(accelerator, args.output_dir, args.resume_from_checkpoint)
    if annealer is not None:
        annealer.on_step(state.completed_steps, total_steps)
    progress = progress_bar(args, accelerator, total_steps, state.completed_steps)
    for epoch in range(state.epoch, args.num_train_epochs):
        if state.completed_steps >= total_steps:
            break
        model.train()
        for batch in state.epoch_batches(accelerator, train_dataloader, epoch):
            with accelerator.accumulate(model):
                loss = compute_loss(model, batch) if compute_loss is not None else model(**batch).loss
                check_finite_loss(accelerator, loss, state.completed_steps + 1, args.learning_rate)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            state.add_batch(loss, batch, accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue
            state.completed_steps += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4g}")
            if args.with_tracking:
                accelerator.log({"train_loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}, state.completed_steps)
            if args.checkpointing_steps != "epoch" and state.completed_steps % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, model, state, f"step_{state.completed_steps}", args.save_total_limit)
            if annealer is not None:
                annealer.on_step(state.completed_steps, total_steps)
            if state.completed_steps >= total_steps:
                break
        _end_epoch(args, accelerator, model, state, epoch, evaluator, eval_dataloaders, results, lr_scheduler)
    progress.close()
    results["epochs"] = state.history
    check_finite_weights(accelerator, model, state.completed_steps)  # what the recipe saves next is finite
    return model, eval_dataloaders, state


def _end_epoch(args, accelerator, model, state, epoch, evaluator, eval_dataloaders, results, lr_scheduler) -> None:
    """The evaluation (if any), the epoch's record in results.json and the trackers, the epoch's checkpoint."""
    from recipe_support.results import log_metrics, write_results

    record = {"lr": lr_scheduler.get_last_lr()[0]}
    if evaluator is not None:
        metrics, dead = evaluator(model, with_progress(args, accelerator, eval_dataloaders))
        log_metrics(accelerator, f"epoch {epoch}", metrics)
        record |= {"eval": metrics, "dead_units": dead}
    entry = state.end_epoch(accelerator, epoch, record)
    if args.with_tracking:
        flat = {f"eval/{split}/{k}": v for split, m in record.get("eval", {}).items() for k, v in m.items()}
        accelerator.log({"epoch_train_loss": entry["train_loss"], **flat}, state.completed_steps)
    results["epochs"] = state.history
    write_results(accelerator, Path(args.output_dir), results)
    if evaluator is not None or state.label != f"step_{state.completed_steps}":  # else nothing new to save
        save_checkpoint(accelerator, model, state, f"epoch_{epoch + 1}", args.save_total_limit)
