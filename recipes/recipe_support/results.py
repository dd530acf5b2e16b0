"""What a run leaves behind: OUTPUT_DIR/results.json (rewritten atomically after every epoch), the final model in
OUTPUT_DIR/model and, when the model holds HeLU, its stock-ReLU export in OUTPUT_DIR/model_relu. An evaluation-only
run writes OUTPUT_DIR/eval_results.json instead (same layout, no epochs), so it never replaces a training run's results.

results.json holds ``config``, ``model`` (activation, LoRA), ``epochs`` (per-epoch train loss, eval metrics,
dead-unit stats), ``final``, ``dead_units``, ``wall_time_s``, ``train_samples_per_s``, ``num_processes`` and
``status`` ("running" until the end, then "complete").
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from torch import nn

from hf_helu.atomic import atomic_directory, atomic_write_json

RESULTS_FILE = "results.json"
EVAL_RESULTS_FILE = "eval_results.json"  # an evaluation-only run's results: a training run's results.json stays
MODEL_DIR = "model"
PREDICTIONS_FILE = "predictions.json"  # --save_predictions: each eval example's model output, per split
EVAL_PREDICTIONS_FILE = "eval_predictions.json"
RELU_SUFFIX = "_relu"


def new_results(accelerator: Any, config: dict[str, Any], model_info: dict[str, Any] | None) -> dict[str, Any]:
    """The results of a run that has just started (``status`` "running", no epoch yet)."""
    return {
        "status": "running",
        "config": config,
        "model": model_info or {},
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "epochs": [],
    }


def results_file(eval_only: bool) -> str:
    """The name of a run's results file in OUTPUT_DIR: eval_results.json for an evaluation-only run."""
    return EVAL_RESULTS_FILE if eval_only else RESULTS_FILE


def write_results(accelerator: Any, output_dir: Path, results: dict[str, Any], name: str = RESULTS_FILE) -> None:
    """OUTPUT_DIR/results.json (or ``name``), atomically, from the main process."""
    if accelerator.is_main_process:
        atomic_write_json(output_dir / name, results)


def write_predictions(accelerator: Any, output_dir: Path, outputs: dict[str, dict[str, Any]], eval_only: bool) -> None:
    """OUTPUT_DIR/predictions.json (eval-only: eval_predictions.json): ``{split: [model output per example]}``."""
    if accelerator.is_main_process:
        predictions = {split: out["predictions"].tolist() for split, out in outputs.items() if "predictions" in out}
        atomic_write_json(output_dir / (EVAL_PREDICTIONS_FILE if eval_only else PREDICTIONS_FILE), predictions)


def log_metrics(accelerator: Any, label: str, metrics: dict[str, dict[str, float]]) -> None:
    """One line per eval split: ``[label] split: key=value ...``."""
    for split, values in metrics.items():
        text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        accelerator.print(f"[{label}] {split}: {text}")


def has_helu(model: nn.Module) -> bool:
    from hf_helu.activation import HeLU

    return any(isinstance(m, HeLU) for m in model.modules())


def relu_export_dir(path: Path) -> Path:
    """Where :func:`save_model` puts the stock-ReLU export of a model saved to ``path``."""
    return path.with_name(path.name + RELU_SUFFIX)


def save_model(accelerator: Any, model: nn.Module, path: Path, processor: Any = None) -> Path | None:
    """Save the final model with ``save_pretrained`` (LoRA merged) to ``path`` atomically.

    When the model holds HeLU, also save a stock-ReLU export (``hf_helu.patching.export_for_inference``) beside it
    as ``<path>_relu``, loadable without hf_helu. Returns that export's path, if any.
    """
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every process calls it
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    unwrapped = accelerator.unwrap_model(model)
    if hasattr(unwrapped, "merge_and_unload"):  # PEFT: ship a plain transformers model
        unwrapped = copy.deepcopy(unwrapped).merge_and_unload()
        state_dict = None
    _save(path, unwrapped, processor, state_dict)
    exported = None
    if has_helu(unwrapped):
        from hf_helu.patching import export_for_inference

        relu_model = copy.deepcopy(unwrapped).cpu()
        export_for_inference(relu_model)
        exported = _save(relu_export_dir(path), relu_model, processor)
    accelerator.wait_for_everyone()
    return exported


def finish_training(
    accelerator: Any,
    model: nn.Module,
    evaluator: Any,
    eval_dataloaders: dict[str, Any],
    state: Any,
    results: dict[str, Any],
    args: Any,
    processor: Any = None,
) -> dict[str, Any]:
    """After the last step (``recipe_support.training.train`` ends with finite weights or stops): the final metrics,
    the model in OUTPUT_DIR/model (and its stock-ReLU export), results.json complete.

    The final metrics are the last epoch's when they are of the final weights (and their outputs, if wanted, are
    held); else (a resume past the last epoch's checkpoint) a new evaluation.
    """
    output_dir = Path(args.output_dir)
    step = state.completed_steps
    last = state.history[-1] if state.history else None
    if last is None or last["step"] != step or (args.save_predictions and not evaluator.last_outputs):
        metrics, dead = evaluator(model, eval_dataloaders)
    else:
        metrics, dead = last["eval"], last["dead_units"]
    model_dir = output_dir / MODEL_DIR
    save_model(accelerator, model, model_dir, processor)
    exported = relu_export_dir(model_dir) if has_helu(accelerator.unwrap_model(model)) else None
    wall_time = state.elapsed()
    results.update(
        status="complete",
        final=metrics,
        dead_units=dead,
        completed_steps=step,
        train_samples=state.train_samples,
        wall_time_s=wall_time,
        train_samples_per_s=state.train_samples / wall_time if wall_time > 0 else None,
        model_dir=str(model_dir),
        relu_export_dir=str(exported) if exported is not None else None,
    )
    write_results(accelerator, output_dir, results)
    if args.save_predictions:  # the outputs of the evaluation the final metrics come from
        write_predictions(accelerator, output_dir, evaluator.last_outputs, eval_only=False)
    log_metrics(accelerator, "final", metrics)
    return results


def _save(path: Path, model: nn.Module, processor: Any, state_dict: dict | None = None) -> Path:
    with atomic_directory(path, overwrite=True) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if processor is not None:
            processor.save_pretrained(tmp)
    return path
