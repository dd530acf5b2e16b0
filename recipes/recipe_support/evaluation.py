"""Evaluation for the recipes' loops: one pass over a dataloader with outputs gathered across processes, and the
dead-unit statistics of that pass (:class:`hf_helu.diagnostics.ActivationMonitor`, reduced over processes).

``eval_step(model, batch) -> dict[str, Tensor | list]`` returns per-sample outputs (first dim = batch). Tensors are
gathered as tensors and concatenated into numpy arrays; lists (e.g. decoded strings, variable-length ids) are
gathered as Python objects. ``compute_metrics(outputs) -> dict[str, float]`` receives those concatenated outputs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recipe_support.results import log_metrics, results_file, write_predictions, write_results

logger = logging.getLogger(__name__)

EvalStep = Callable[[nn.Module, Mapping[str, Any]], dict[str, Any]]
ComputeMetrics = Callable[[dict[str, Any]], dict[str, float]]


def default_eval_step(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Logits and labels of one batch (the classification/regression case)."""
    outputs = model(**batch)
    return {"predictions": outputs.logits, "labels": batch["labels"]}


def _gather(accelerator: Any, dataloader: Any, model: nn.Module, eval_step: EvalStep) -> dict[str, Any]:
    gathered: dict[str, list] = {}
    with torch.no_grad():
        for batch in dataloader:
            for key, value in eval_step(model, batch).items():
                if isinstance(value, torch.Tensor):
                    value = accelerator.gather_for_metrics(value.detach()).float().cpu().numpy()
                    gathered.setdefault(key, []).append(value)
                else:
                    objects = accelerator.gather_for_metrics(list(value), use_gather_object=True)
                    gathered.setdefault(key, []).extend(objects)
    return {k: np.concatenate(v) if v and isinstance(v[0], np.ndarray) else v for k, v in gathered.items()}


def evaluate(
    accelerator: Any,
    model: nn.Module,
    dataloader: Any,
    compute_metrics: ComputeMetrics,
    eval_step: EvalStep = default_eval_step,
    monitor: Any = None,
    outputs_sink: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Metrics over every sample of ``dataloader`` exactly once (gathered across processes).

    Adds ``num_samples`` (how many samples the metrics saw). ``monitor`` (an object with ``start()``/``stop()``,
    e.g. the dead-unit tracker) records only during this pass; the caller reads its statistics. ``outputs_sink``
    receives the gathered per-sample outputs, in dataset order.
    """
    model.eval()
    if monitor is not None:
        monitor.start()
    try:
        outputs = _gather(accelerator, dataloader, model, eval_step)
    finally:
        if monitor is not None:
            monitor.stop()
    if outputs_sink is not None:
        outputs_sink.update(outputs)
    metrics = {k: float(v) for k, v in compute_metrics(outputs).items()}
    metrics["num_samples"] = len(next(iter(outputs.values()))) if outputs else 0
    return metrics


class DeadUnitTracker:
    """Attach :class:`hf_helu.diagnostics.ActivationMonitor` for one eval pass, then reduce across processes."""

    def __init__(self, monitor: Any, accelerator: Any):
        self.monitor = monitor
        self.accelerator = accelerator

    @classmethod
    def create(cls, model: nn.Module, accelerator: Any, scope: Any = "ffn") -> DeadUnitTracker | None:
        """A tracker for ``model``'s activations in ``scope``, or None (logged) when the monitor cannot read it."""
        try:
            from hf_helu.diagnostics import ActivationMonitor

            monitor = ActivationMonitor(accelerator.unwrap_model(model), scope=scope)
        except Exception as err:  # a model the monitor cannot read: the run goes on, results say why
            logger.warning("dead-unit monitor unavailable for this model: %s", err)
            return None
        return cls(monitor, accelerator)

    def start(self) -> None:
        self.monitor.reset()
        self.monitor.attach()

    def stop(self) -> None:
        self.monitor.detach()

    def stats(self) -> dict[str, Any]:
        """Statistics of the last pass, summed over processes (collective: every process calls it)."""
        return json.loads(json.dumps(self.monitor.stats(self.accelerator).to_dict(), default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return str(value)


class Evaluator:
    """Evaluates every eval split with the task's ``eval_step`` and ``compute_metrics``; the dead-unit tracker (if
    any) watches the first split only."""

    def __init__(
        self, accelerator: Any, compute_metrics: ComputeMetrics, eval_step: EvalStep, tracker: DeadUnitTracker | None
    ):
        self.accelerator = accelerator
        self.compute_metrics = compute_metrics
        self.eval_step = eval_step
        self.tracker = tracker
        self.last_outputs: dict[str, dict[str, Any]] = {}  # the gathered outputs of the last pass, per split

    def __call__(self, model: nn.Module, dataloaders: Mapping[str, Any]) -> tuple[dict[str, Any], dict | None]:
        """(metrics per split, dead-unit statistics of the first split or None)."""
        metrics, dead = {}, None
        self.last_outputs = {split: {} for split in dataloaders}
        for i, (split, dataloader) in enumerate(dataloaders.items()):
            monitor = self.tracker if i == 0 else None
            metrics[split] = evaluate(
                self.accelerator,
                model,
                dataloader,
                self.compute_metrics,
                self.eval_step,
                monitor,
                self.last_outputs[split],
            )
            if monitor is not None:
                dead = {"split": split, **monitor.stats()}
        return metrics, dead


def make_evaluator(
    accelerator: Any, model: nn.Module, compute_metrics: ComputeMetrics, eval_step: EvalStep, scope: Any
) -> Evaluator:
    """An :class:`Evaluator` that also reports the dead units of ``model``'s activations in ``scope``."""
    return Evaluator(accelerator, compute_metrics, eval_step, DeadUnitTracker.create(model, accelerator, scope))


def evaluate_only(
    accelerator: Any,
    model: nn.Module,
    dataloaders: dict[str, Any],
    evaluator: Evaluator,
    args: Any,
    results: dict[str, Any],
) -> dict[str, Any]:
    """--eval_only: evaluate the prepared ``model`` once, write OUTPUT_DIR/eval_results.json (and predictions)."""
    start = time.perf_counter()
    metrics, dead = evaluator(model, dataloaders)
    log_metrics(accelerator, "eval", metrics)
    results.update(status="complete", final=metrics, dead_units=dead, wall_time_s=time.perf_counter() - start)
    write_results(accelerator, Path(args.output_dir), results, results_file(eval_only=True))
    if args.save_predictions:
        write_predictions(accelerator, Path(args.output_dir), evaluator.last_outputs, eval_only=True)
    return results
