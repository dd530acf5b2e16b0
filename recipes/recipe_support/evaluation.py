"""Evaluation for the recipes' loops: one pass per eval split of ``eval_step(model, batch)``'s per-sample outputs,
gathered across processes (``accelerator.gather_for_metrics``; tensors as numpy arrays, lists as objects) for
``compute_metrics(outputs)``, and the dead units of the first split's pass (``hf_helu.ActivationMonitor``)."""

from __future__ import annotations

import contextlib
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


def default_eval_step(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:  # classification, regression
    return {"predictions": model(**batch).logits, "labels": batch["labels"]}


class Evaluator:
    """Evaluates every eval split with ``eval_step`` and ``compute_metrics``; ``monitor`` (an ActivationMonitor or
    None) records the first split only. ``last_outputs``: the last pass's gathered outputs per split."""

    def __init__(self, accelerator: Any, compute_metrics: Callable, eval_step: Callable, monitor: Any = None):
        self.accelerator, self.compute_metrics, self.eval_step, self.monitor = (
            accelerator,
            compute_metrics,
            eval_step,
            monitor,
        )
        self.last_outputs: dict[str, dict[str, Any]] = {}

    def _gather(self, model: nn.Module, dataloader: Any) -> dict[str, Any]:
        gathered: dict[str, list] = {}
        with torch.no_grad():
            for batch in dataloader:
                for key, value in self.eval_step(model, batch).items():
                    if isinstance(value, torch.Tensor):
                        value = [self.accelerator.gather_for_metrics(value.detach()).float().cpu().numpy()]
                    else:
                        value = self.accelerator.gather_for_metrics(list(value), use_gather_object=True)
                    gathered.setdefault(key, []).extend(value)
        return {k: np.concatenate(v) if v and isinstance(v[0], np.ndarray) else v for k, v in gathered.items()}

    def __call__(self, model: nn.Module, dataloaders: Mapping[str, Any]) -> tuple[dict[str, Any], dict | None]:
        """(metrics per split, each with ``num_samples``; dead-unit statistics of the first split, or None)."""
        model.eval()
        metrics, dead, self.last_outputs = {}, None, {}
        for i, (split, dataloader) in enumerate(dataloaders.items()):
            monitor = self.monitor if i == 0 else None
            if monitor is not None:
                monitor.reset()
            with monitor or contextlib.nullcontext():
                outputs = self.last_outputs[split] = self._gather(model, dataloader)
            metrics[split] = {k: float(v) for k, v in self.compute_metrics(outputs).items()}
            metrics[split]["num_samples"] = len(next(iter(outputs.values()))) if outputs else 0
            if monitor is not None:  # summed over processes (collective: every process calls it)
                dead = {"split": split, **monitor.stats(self.accelerator).to_dict()}
        return metrics, dead


def make_evaluator(accelerator: Any, model: nn.Module, compute_metrics: Callable, eval_step: Callable, scope: Any):
    """An :class:`Evaluator` that also reports the dead units in ``scope`` (None, logged, for an unreadable model)."""
    from hf_helu.diagnostics import ActivationMonitor

    try:
        monitor = ActivationMonitor(accelerator.unwrap_model(model), scope=scope)
    except Exception as err:
        logger.warning("dead-unit monitor unavailable for this model: %s", err)
        monitor = None
    return Evaluator(accelerator, compute_metrics, eval_step, monitor)


def evaluate_only(
    accelerator: Any, model: nn.Module, dataloaders: dict, evaluator: Evaluator, args: Any, results: dict
):
    """--eval_only: evaluate the prepared ``model`` once, write OUTPUT_DIR/eval_results.json (and predictions)."""
    start = time.perf_counter()
    metrics, dead = evaluator(model, dataloaders)
    log_metrics(accelerator, "eval", metrics)
    results.update(status="complete", final=metrics, dead_units=dead, wall_time_s=time.perf_counter() - start)
    write_results(accelerator, Path(args.output_dir), results, results_file(eval_only=True))
    if args.save_predictions:
        write_predictions(accelerator, Path(args.output_dir), evaluator.last_outputs, eval_only=True)
    return results
