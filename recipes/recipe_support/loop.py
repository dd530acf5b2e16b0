"""A small, task-agnostic Accelerate training loop shared by the GLUE and speech recipes.

    accelerator = make_accelerator(mixed_precision, gradient_accumulation_steps, seed)
    results = fit(accelerator, model, train_dataloader, {"dev": eval_dataloader}, compute_metrics, config,
                  hooks=FitHooks(on_step=..., compute_loss=...), processor=tokenizer, run_config=..., model_info=...)

:func:`fit` trains (or only evaluates, ``config.eval_only``), evaluates every epoch, checkpoints with
``accelerator.save_state`` into OUTPUT_DIR/checkpoints/{step_N,epoch_N} every ``config.checkpointing_steps`` and at
each epoch end, resumes from one (skipping the batches it had already seen), writes OUTPUT_DIR/results.json
(eval-only: OUTPUT_DIR/eval_results.json) atomically after every epoch, saves the final model to OUTPUT_DIR/model
(and a stock-ReLU export to OUTPUT_DIR/model_relu when the model holds HeLU) atomically, and returns the results.

``eval_dataloaders`` maps a split name to a dataloader (``{"dev": dl}``, MNLI: ``{"dev_matched": ..,
"dev_mismatched": ..}``); metrics are reported per split (:mod:`recipe_support.evaluation`).

Distributed use: ``accelerate launch [--num_processes N] recipe.py ...`` (or ``torchrun`` with
``ACCELERATE_USE_CPU=1`` on a CPU box); FSDP and DeepSpeed are configured by ``accelerate config`` and need no code
change here (the final model is saved from ``accelerator.get_state_dict``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recipe_support.args import FitConfig
from recipe_support.checkpoints import load_checkpoint, prune_checkpoints, save_checkpoint
from recipe_support.evaluation import ComputeMetrics, DeadUnitTracker, EvalStep, Evaluator, default_eval_step
from recipe_support.output_dir import claim_output_dir
from recipe_support.results import (
    MODEL_DIR,
    has_helu,
    log_metrics,
    new_results,
    relu_export_dir,
    results_file,
    save_model,
    write_predictions,
    write_results,
)

StepHook = Callable[[int, int], None]
ComputeLoss = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
OptimizerFn = Callable[[nn.Module, FitConfig, int], tuple[torch.optim.Optimizer, Any]]


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1, seed: int = 42):
    """An Accelerator with the run's precision and accumulation, and a sampler whose order depends on seed+epoch."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )


def create_optimizer_and_scheduler(
    model: nn.Module, config: FitConfig, num_training_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on biases and LayerNorm weights) with linear warmup and decay."""
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    warmup = math.ceil(config.warmup_ratio * num_training_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, num_training_steps)


@dataclass(frozen=True)
class FitHooks:
    """What a task plugs into the loop besides its metrics.

    - ``eval_step(model, batch) -> dict``: per-sample eval outputs (default: logits and labels).
    - ``compute_loss(model, batch) -> Tensor``: replaces the training loss ``model(**batch).loss`` (e.g.
      :class:`hf_helu.conversion.FFNDistiller`; ``train_loss`` then reports it).
    - ``on_step(completed_steps, total_steps)``: the step hook. Runs before the first step (also after a resume)
      and after every optimizer step, once that step's checkpoint (if due) is written; e.g.
      :meth:`hf_helu.conversion.ActivationAnnealer.on_step`. Tests use it to stop a run abruptly after step N.
    - ``optimizer_fn(model, config, num_training_steps) -> (optimizer, lr_scheduler)``: default
      :func:`create_optimizer_and_scheduler`.
    """

    eval_step: EvalStep = default_eval_step
    compute_loss: ComputeLoss | None = None
    on_step: StepHook | None = None
    optimizer_fn: OptimizerFn = create_optimizer_and_scheduler


@dataclass
class LoopState:
    """The loop's counters, saved in every checkpoint (``trainer_state.json``, with the per-epoch history)."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    train_samples: int = 0
    wall_time_s: float = 0.0


def fit(
    accelerator: Any,
    model: nn.Module,
    train_dataloader: Any,
    eval_dataloaders: Mapping[str, Any],
    compute_metrics: ComputeMetrics,
    config: FitConfig,
    *,
    hooks: FitHooks = FitHooks(),
    processor: Any = None,
    run_config: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (unless ``config.eval_only``), evaluate, checkpoint, and write OUTPUT_DIR/results.json.

    The output folder is claimed first (:func:`recipe_support.output_dir.claim_output_dir`: writable, locked,
    no other run's files); an eval-only run writes OUTPUT_DIR/eval_results.json instead.

    Dataloaders and model are passed un-prepared; ``fit`` calls ``accelerator.prepare``. ``train_dataloader`` may
    be None with ``eval_only``. ``run_config`` (default: ``config`` itself) and ``model_info`` (from
    :func:`recipe_support.models.prepare_model`) are recorded as they are. Returns the results dict.

    After a resume, the history comes from the checkpoint, and the resumed epoch's ``train_loss`` averages the
    batches run after the resume only; ``wall_time_s`` counts the time up to the checkpoint plus the resumed part.
    """
    eval_dataloaders = dict(eval_dataloaders)
    if not eval_dataloaders:
        raise ValueError("fit needs at least one eval dataloader")
    if run_config is None:
        run_config = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    if train_dataloader is None and not config.eval_only:
        raise ValueError("fit needs a train dataloader unless eval_only")
    results = new_results(accelerator, run_config, model_info)
    with claim_output_dir(accelerator, config):  # a no-op count when the recipe has claimed it already
        tracker = DeadUnitTracker.create(model, accelerator, config.monitor_scope) if config.track_dead_units else None
        evaluator = Evaluator(accelerator, compute_metrics, hooks.eval_step, tracker)
        if config.eval_only:
            return _evaluate_only(accelerator, model, eval_dataloaders, evaluator, config, results)
        trainer = _Trainer(accelerator, config, hooks, evaluator, results)
        trainer.prepare(model, train_dataloader, eval_dataloaders)
        trainer.train()
        return trainer.finish(processor)


def _evaluate_only(
    accelerator: Any,
    model: nn.Module,
    eval_dataloaders: dict[str, Any],
    evaluator: Evaluator,
    config: FitConfig,
    results: dict[str, Any],
) -> dict[str, Any]:
    names = list(eval_dataloaders)
    model, *dls = accelerator.prepare(model, *eval_dataloaders.values())
    start = time.perf_counter()
    metrics, dead = evaluator(model, dict(zip(names, dls, strict=True)))
    log_metrics(accelerator, "eval", metrics)
    results.update(status="complete", final=metrics, dead_units=dead, wall_time_s=time.perf_counter() - start)
    write_results(accelerator, config.output_dir, results, results_file(eval_only=True))
    if config.save_predictions:
        write_predictions(accelerator, config.output_dir, evaluator.last_outputs, eval_only=True)
    return results


def total_training_steps(config: FitConfig, batches_per_epoch: int, num_processes: int) -> int:
    """Optimizer steps each process runs, from the un-prepared dataloader's length (a prepared one is sharded)."""
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total = config.epochs * math.ceil(steps_per_epoch / num_processes)
    return total if config.max_steps is None else min(total, config.max_steps)


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 0


class _Trainer:
    """One training run of :func:`fit`: prepare (and resume), the epochs, the final save."""

    def __init__(
        self, accelerator: Any, config: FitConfig, hooks: FitHooks, evaluator: Evaluator, results: dict[str, Any]
    ):
        self.accelerator = accelerator
        self.config = config
        self.hooks = hooks
        self.evaluate = evaluator
        self.results = results
        self.state = LoopState()
        self.start = time.perf_counter()

    # -- before the first step ---------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, train_dataloader: Any, eval_dataloaders: dict[str, Any]) -> None:
        """Build the optimizer, ``accelerator.prepare`` everything, resume if asked."""
        acc, config = self.accelerator, self.config
        self.total_steps = total_training_steps(config, len(train_dataloader), acc.num_processes)
        # The prepared scheduler steps once per process per optimizer step: schedule over all of them.
        optimizer, lr_scheduler = self.hooks.optimizer_fn(model, config, self.total_steps * acc.num_processes)
        if getattr(train_dataloader, "generator", None) is None:
            # Each new DataLoader iterator draws a seed from its generator, else from the global torch RNG, which
            # would shift dropout after a resume (load_state restores that RNG before the epoch's iterator exists).
            train_dataloader.generator = torch.Generator().manual_seed(config.seed)
        names = list(eval_dataloaders)
        self.model, self.optimizer, self.train_dataloader, self.lr_scheduler, *dls = acc.prepare(
            model, optimizer, train_dataloader, lr_scheduler, *eval_dataloaders.values()
        )
        self.eval_dataloaders = dict(zip(names, dls, strict=True))
        if config.resume_from_checkpoint:
            self._resume(config.resume_from_checkpoint)

    def _resume(self, which: str) -> None:
        path, saved = load_checkpoint(self.accelerator, self.config.output_dir, which)
        self.state = LoopState(**{f.name: saved[f.name] for f in dataclasses.fields(LoopState)})
        self.results["epochs"] = saved.get("history", [])
        self.results["resumed_from"] = str(path)

    # -- the epochs --------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.state.completed_steps >= self.total_steps

    def train(self) -> None:
        """Epochs from the current one (after a resume: the checkpoint's) until ``epochs`` or ``total_steps``."""
        from tqdm.auto import tqdm

        self._notify_step()
        progress = tqdm(
            total=self.total_steps,
            initial=self.state.completed_steps,
            disable=not self.accelerator.is_local_main_process or not self.config.progress,
            desc="train",
        )
        self.start = time.perf_counter() - self.state.wall_time_s
        for epoch in range(self.state.epoch, self.config.epochs):
            if self.done:
                break
            train_loss = self._run_epoch(epoch, progress)
            self._end_epoch(epoch, train_loss)
        progress.close()

    def _run_epoch(self, epoch: int, progress: Any) -> float:
        """One epoch's batches (after a resume, those not yet seen); returns the mean training loss."""
        acc = self.accelerator
        self.model.train()
        # The seedable sampler's order depends on seed + epoch only; a skipping loader must be told the epoch too.
        skip = self.state.batches_in_epoch
        batches = acc.skip_first_batches(self.train_dataloader, skip) if skip else self.train_dataloader
        batches.set_epoch(epoch)
        loss_sum, loss_count = torch.zeros((), device=acc.device), 0
        for batch in batches:
            loss = self._train_batch(batch)
            loss_sum += loss.detach().float()
            loss_count += 1
            self.state.batches_in_epoch += 1
            self.state.train_samples += _batch_size(batch) * acc.num_processes
            if acc.sync_gradients:
                self._after_optimizer_step(loss, progress)
                if self.done:
                    break
        return acc.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)

    def _train_batch(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Forward, backward and (at the end of an accumulation window) one optimizer step."""
        acc, model, compute_loss = self.accelerator, self.model, self.hooks.compute_loss
        with acc.accumulate(model):
            loss = compute_loss(model, batch) if compute_loss is not None else model(**batch).loss
            acc.backward(loss)
            if acc.sync_gradients and self.config.max_grad_norm:
                acc.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return loss

    def _after_optimizer_step(self, loss: torch.Tensor, progress: Any) -> None:
        self.state.completed_steps += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        every = self.config.checkpointing_steps
        if every and self.state.completed_steps % every == 0:
            self.state.wall_time_s = time.perf_counter() - self.start
            self._checkpoint(f"step_{self.state.completed_steps}")
        self._notify_step()

    def _notify_step(self) -> None:
        if self.hooks.on_step is not None:
            self.hooks.on_step(self.state.completed_steps, self.total_steps)

    def _end_epoch(self, epoch: int, train_loss: float) -> None:
        """Evaluate, record the epoch, write results.json, checkpoint ``epoch_<epoch + 1>``."""
        metrics, dead = self.evaluate(self.model, self.eval_dataloaders)
        log_metrics(self.accelerator, f"epoch {epoch}", metrics)
        self.results["epochs"].append(
            {
                "epoch": epoch,
                "step": self.state.completed_steps,
                "train_loss": train_loss,
                "lr": self.lr_scheduler.get_last_lr()[0],
                "eval": metrics,
                "dead_units": dead,
            }
        )
        self.state.epoch, self.state.batches_in_epoch = epoch + 1, 0
        self.state.wall_time_s = time.perf_counter() - self.start
        write_results(self.accelerator, self.config.output_dir, self.results)
        self._checkpoint(f"epoch_{epoch + 1}")

    def _checkpoint(self, name: str) -> None:
        state = {**dataclasses.asdict(self.state), "history": self.results["epochs"]}
        save_checkpoint(self.accelerator, self.config.output_dir, name, state)
        prune_checkpoints(self.accelerator, self.config.output_dir, self.config.save_total_limit)

    # -- after the last step -----------------------------------------------------------------------------------

    def finish(self, processor: Any) -> dict[str, Any]:
        """Final metrics (the last epoch's, or a new evaluation after a resume past it), the saved model, results."""
        train_time = time.perf_counter() - self.start
        last = self.results["epochs"][-1] if self.results["epochs"] else None
        # A new evaluation when resumed after the last epoch's checkpoint (or when its outputs are to be saved).
        stale = last is None or last["step"] != self.state.completed_steps
        if stale or (self.config.save_predictions and not self.evaluate.last_outputs):
            metrics, dead = self.evaluate(self.model, self.eval_dataloaders)
        else:
            metrics, dead = last["eval"], last["dead_units"]
        model_dir = self.config.output_dir / MODEL_DIR
        save_model(self.accelerator, self.model, model_dir, processor)
        samples = self.state.train_samples
        exported = relu_export_dir(model_dir) if has_helu(self.accelerator.unwrap_model(self.model)) else None
        self.results.update(
            status="complete",
            final=metrics,
            dead_units=dead,
            completed_steps=self.state.completed_steps,
            train_samples=samples,
            wall_time_s=train_time,
            train_samples_per_s=samples / train_time if train_time > 0 else None,
            model_dir=str(model_dir),
            relu_export_dir=str(exported) if exported is not None else None,
        )
        write_results(self.accelerator, self.config.output_dir, self.results)
        if self.config.save_predictions:  # the outputs of the evaluation the final metrics come from
            write_predictions(self.accelerator, self.config.output_dir, self.evaluate.last_outputs, eval_only=False)
        log_metrics(self.accelerator, "final", metrics)
        return self.results


__all__ = [
    "FitConfig",
    "FitHooks",
    "LoopState",
    "create_optimizer_and_scheduler",
    "fit",
    "make_accelerator",
    "total_training_steps",
]
