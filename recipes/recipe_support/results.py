"""What a run leaves behind: OUTPUT_DIR/results.json (rewritten atomically after every epoch; ``status`` "running"
until the end), the final model in OUTPUT_DIR/model and, when it holds HeLU, its stock-ReLU export in
OUTPUT_DIR/model_relu, each with a model card (:func:`hf_helu.model_card.conversion_card`), and with
``--push_to_hub`` the upload (``create_repo`` before any training, ``upload_folder`` at the end). An evaluation-only
run writes OUTPUT_DIR/eval_results.json instead, so it never replaces a training run's results."""

from __future__ import annotations

import copy
import shlex
import sys
from pathlib import Path
from typing import Any

from torch import nn

from hf_helu.atomic import atomic_directory, atomic_write_json, atomic_write_text
from hf_helu.errors import UsageError

RESULTS_FILE = "results.json"
EVAL_RESULTS_FILE = "eval_results.json"
MODEL_DIR = "model"
PREDICTIONS_FILE = "predictions.json"  # --save_predictions: each eval example's model output, per split
EVAL_PREDICTIONS_FILE = "eval_predictions.json"
RELU_SUFFIX = "_relu"
OUTPUT_FILES = (RESULTS_FILE, EVAL_RESULTS_FILE, PREDICTIONS_FILE, EVAL_PREDICTIONS_FILE)


def command_line(script: str, argv: list[str] | None) -> str:
    """How the run was started (``python recipes/<script> ...``), the value of ``--hub_token`` never written."""
    shown, hide = [], False
    for arg in sys.argv[1:] if argv is None else map(str, argv):
        shown.append("***" if hide else "--hub_token=***" if arg.startswith("--hub_token=") else arg)
        hide = arg == "--hub_token"
    return shlex.join(["python", f"recipes/{Path(script).name}", *shown])


def check_hub(args: Any) -> None:
    """With ``--push_to_hub``: create (or find) the repository now, so an offline hub or a bad token or name stops
    the run before it trains; sets ``args.hub_repo_id``."""
    if not args.push_to_hub:
        return
    from huggingface_hub import create_repo

    name = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        args.hub_repo_id = create_repo(name, token=args.hub_token, exist_ok=True).repo_id
    except Exception as error:  # any failure to reach or use the hub: network, offline mode, token, repo name
        raise UsageError(f"--push_to_hub: cannot create the hub repository {name!r}: {error}") from None


def new_results(accelerator: Any, config: dict[str, Any], model_info: dict[str, Any] | None) -> dict[str, Any]:
    processes, precision = accelerator.num_processes, accelerator.mixed_precision
    info = {"model": model_info or {}, "num_processes": processes, "mixed_precision": precision, "epochs": []}
    return {"status": "running", "config": config, **info}


def results_file(eval_only: bool) -> str:
    return EVAL_RESULTS_FILE if eval_only else RESULTS_FILE


def write_results(accelerator: Any, output_dir: Path, results: dict[str, Any], name: str = RESULTS_FILE) -> None:
    if accelerator.is_main_process:
        atomic_write_json(Path(output_dir) / name, results)


def write_predictions(accelerator: Any, output_dir: Path, outputs: dict[str, dict[str, Any]], eval_only: bool) -> None:
    """OUTPUT_DIR/[eval_]predictions.json: ``{split: [model output per example]}``."""
    predictions = {split: out["predictions"].tolist() for split, out in outputs.items() if "predictions" in out}
    write_results(accelerator, output_dir, predictions, EVAL_PREDICTIONS_FILE if eval_only else PREDICTIONS_FILE)


def log_metrics(accelerator: Any, label: str, metrics: dict[str, dict[str, float]]) -> None:  # a line per split
    for split, values in metrics.items():
        text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        accelerator.print(f"[{label}] {split}: {text}")


def save_model(accelerator: Any, model: nn.Module, path: Path, processor: Any = None) -> Path | None:
    """``save_pretrained`` (LoRA merged) to ``path`` atomically and, when the model holds HeLU, its stock-ReLU export
    (``hf_helu.patching.export_for_inference``) to ``<path>_relu``, whose path it returns."""
    from hf_helu.activation import HeLU
    from hf_helu.patching import export_for_inference

    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under FSDP/DeepSpeed: every process calls it
    unwrapped = accelerator.unwrap_model(model)
    exported = (
        path.with_name(path.name + RELU_SUFFIX) if any(isinstance(m, HeLU) for m in unwrapped.modules()) else None
    )
    if accelerator.is_main_process:
        if hasattr(unwrapped, "merge_and_unload"):  # PEFT: ship a plain transformers model
            unwrapped, state_dict = copy.deepcopy(unwrapped).merge_and_unload(), None
        models = [(path, unwrapped, state_dict)]
        if exported is not None:
            models.append((exported, copy.deepcopy(unwrapped).cpu(), None))
            export_for_inference(models[-1][1])
        for folder, saved, weights in models:
            with atomic_directory(folder, overwrite=True) as tmp:
                saved.save_pretrained(tmp, state_dict=weights)
                if processor is not None:
                    processor.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return exported


def finish_training(
    accelerator, model, evaluator, eval_dataloaders, state, results: dict, args, processor=None
) -> dict:
    """After the loop: the final metrics (the last epoch's when they are of the final weights, else a new
    evaluation), the model (and its stock-ReLU export) in OUTPUT_DIR, results.json complete."""
    output_dir, step = Path(args.output_dir), state.completed_steps
    last = state.history[-1] if state.history else None
    if last is None or last["step"] != step or (args.save_predictions and not evaluator.last_outputs):
        metrics, dead = evaluator(model, eval_dataloaders)
    else:
        metrics, dead = last["eval"], last["dead_units"]
    exported = save_model(accelerator, model, output_dir / MODEL_DIR, processor)
    wall, samples = state.elapsed(), state.train_samples
    results.update(status="complete", final=metrics, dead_units=dead, completed_steps=step, wall_time_s=wall)
    results.update(train_samples=samples, train_samples_per_s=samples / wall if wall > 0 else None)
    results.update(model_dir=str(output_dir / MODEL_DIR), relu_export_dir=str(exported) if exported else None)
    write_results(accelerator, output_dir, results)
    if args.save_predictions:  # the outputs of the evaluation the final metrics come from
        write_predictions(accelerator, output_dir, evaluator.last_outputs, eval_only=False)
    log_metrics(accelerator, "final", metrics)
    return results


def publish(accelerator: Any, args: Any, source: str | None, results: dict[str, Any], metrics: dict) -> None:
    """Model cards in OUTPUT_DIR/model (and model_relu) saying what was converted, how, and what the run measured;
    then, with ``--push_to_hub``, the model (its stock-ReLU export if any) uploaded to ``args.hub_repo_id``."""
    from hf_helu.model_card import conversion_card

    if not accelerator.is_main_process:
        return
    info = results.get("model", {})
    conversion = info.get("conversion") or info.get("conversion_choice") or {}
    note = "This is the stock-ReLU export of the HeLU model (same forward; loads without hf_helu)."
    for folder, details in ((results["model_dir"], ""), (results.get("relu_export_dir"), note)):
        if folder:
            card = conversion_card(
                source or "a new model",
                activation=info.get("activation") or info.get("hidden_act", "keep"),
                alpha=info.get("alpha"),
                method=conversion.get("choice", conversion).get("method", "none"),
                results=_flat(metrics),
                details="\n".join(filter(None, [details, args.command])),
            )
            atomic_write_text(Path(folder) / "README.md", str(card))
    if args.push_to_hub:
        from huggingface_hub import upload_folder

        folder = results.get("relu_export_dir") or results["model_dir"]
        upload_folder(repo_id=args.hub_repo_id, folder_path=folder, token=args.hub_token, commit_message="hf-helu")
        accelerator.print(f"pushed {folder} to https://huggingface.co/{args.hub_repo_id}")


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows.update(_flat(value, f"{prefix}{key} "))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows[f"{prefix}{key}"] = value
    return rows
