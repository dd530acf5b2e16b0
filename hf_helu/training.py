"""A small, task-agnostic Accelerate training loop shared by the GLUE and speech recipes.

API (everything a recipe needs, in the order a recipe uses it)::

    add_training_args(parser, **defaults) -> argparse.ArgumentParser
        Adds the common knobs: --model --output_dir --overwrite_output_dir --epochs --max_steps --lr --batch_size
        --eval_batch_size --gradient_accumulation_steps --warmup_ratio --weight_decay --max_grad_norm --seed
        --max_train_samples --max_eval_samples --eval_only --resume_from_checkpoint (PATH or "latest")
        --checkpointing_steps --save_total_limit --mixed_precision no|fp16|bf16 --activation keep|relu|helu --alpha
        --scope ffn|all|0,1,5 --lora --lora_r --lora_alpha --lora_dropout --lora_target_modules
        --init pretrained|scratch --no_progress.
        ``defaults`` overrides a knob's default (e.g. ``lr=5e-5``).
    make_accelerator(args) -> Accelerator
        Mixed precision, gradient accumulation and a seedable sampler (so a resumed run sees the same batches).
    load_model(auto_class, name_or_path, init="pretrained", **config_kwargs) -> PreTrainedModel
        ``from_pretrained`` in float32, or the same config with random weights for ``init="scratch"``.
    prepare_model(model, args, lora_task_type=None) -> (model, dict)
        Applies --activation/--alpha/--scope (HeLU patching from :mod:`hf_helu.patching`) then --lora (PEFT);
        returns the model and a JSON-able description of what was done.
    fit(accelerator, model, train_dataloader, eval_dataloaders, compute_metrics, args, *, eval_step=...,
        processor=None, config=None, model_info=None, optimizer_fn=create_optimizer_and_scheduler,
        track_dead_units=True) -> dict
        Trains (or only evaluates with --eval_only), evaluates every epoch, checkpoints with
        ``accelerator.save_state`` into OUTPUT_DIR/checkpoints/{step_N,epoch_N} every --checkpointing_steps and at
        each epoch end, resumes from one (skipping the batches it had already seen), writes OUTPUT_DIR/results.json
        atomically after every epoch, saves the final model to OUTPUT_DIR/model (and a stock-ReLU export to
        OUTPUT_DIR/model_relu when the model holds HeLU) atomically, and returns the results dict.
    evaluate(accelerator, model, dataloader, compute_metrics, eval_step=default_eval_step, monitor=None) -> dict
        One pass over ``dataloader``; outputs are gathered with ``accelerator.gather_for_metrics`` so the metrics
        see every sample exactly once, whatever the number of processes.

``eval_step(model, batch) -> dict[str, Tensor | list]`` returns per-sample outputs (first dim = batch). Tensors are
gathered as tensors and concatenated into numpy arrays; lists (e.g. decoded strings, variable-length ids) are
gathered as Python objects. ``compute_metrics(outputs) -> dict[str, float]`` receives those concatenated outputs.
The default eval step returns ``{"predictions": logits, "labels": batch["labels"]}``.

``eval_dataloaders`` maps a split name to a dataloader (``{"dev": dl}``, MNLI: ``{"dev_matched": ..,
"dev_mismatched": ..}``); metrics are reported per split. results.json holds ``config``, ``model`` (activation,
LoRA), ``epochs`` (per-epoch train loss, eval metrics, dead-unit stats), ``final``, ``dead_units``,
``wall_time_s``, ``train_samples_per_s``, ``num_processes`` and ``status`` ("running" until the end, then
"complete").

Distributed use: ``accelerate launch [--num_processes N] recipe.py ...`` (or ``torchrun`` with
``ACCELERATE_USE_CPU=1`` on a CPU box); FSDP and DeepSpeed are configured by ``accelerate config`` and need no code
change here (the final model is saved from ``accelerator.get_state_dict``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_helu.atomic import atomic_directory, atomic_write_json

logger = logging.getLogger(__name__)

ACTIVATIONS = ("keep", "relu", "helu")
INITS = ("pretrained", "scratch")
RESULTS_FILE = "results.json"
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"

EvalStep = Callable[[nn.Module, Mapping[str, Any]], dict[str, Any]]
ComputeMetrics = Callable[[dict[str, Any]], dict[str, float]]


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def add_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Add the knobs every recipe shares to ``parser``; ``defaults`` overrides their default values."""
    g = parser.add_argument_group("training (hf_helu.training)")
    g.add_argument("--model", default=None, help="Local folder or hub id.")
    g.add_argument("--output_dir", default="runs/out", help="Where checkpoints, results.json and the model go.")
    g.add_argument("--overwrite_output_dir", action="store_true", help="Start afresh even if checkpoints exist.")
    g.add_argument("--epochs", type=_positive_int, default=3)
    g.add_argument("--max_steps", type=_positive_int, default=None, help="Stop after this many optimizer steps.")
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--batch_size", type=_positive_int, default=32, help="Per-process training batch size.")
    g.add_argument("--eval_batch_size", type=_positive_int, default=None, help="Default: 2 x --batch_size.")
    g.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1)
    g.add_argument("--warmup_ratio", type=_fraction, default=0.1)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--max_train_samples", type=_positive_int, default=None)
    g.add_argument("--max_eval_samples", type=_positive_int, default=None)
    g.add_argument("--eval_only", action="store_true", help="Evaluate --model and write results.json; no training.")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='A checkpoint folder, or "latest" for the newest one in OUTPUT_DIR/checkpoints.',
    )
    g.add_argument("--checkpointing_steps", type=_positive_int, default=None, help="Also checkpoint every N steps.")
    g.add_argument("--save_total_limit", type=_positive_int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    g.add_argument("--activation", choices=ACTIVATIONS, default="keep", help="FFN activation to train with.")
    g.add_argument("--alpha", type=float, default=0.05, help="HeLU margin: gradient passes where z > -alpha.")
    g.add_argument("--scope", default="ffn", help='Which activations to patch: "ffn" or "all".')
    g.add_argument("--lora", action="store_true", help="Train PEFT LoRA adapters instead of all weights.")
    g.add_argument("--lora_r", type=_positive_int, default=8)
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument("--lora_dropout", type=float, default=0.1)
    g.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=None,
        help="Module names for LoRA (default: PEFT's choice for the architecture).",
    )
    g.add_argument("--init", choices=INITS, default="pretrained", help="scratch: same config, random weights.")
    g.add_argument("--no_progress", action="store_true", help="No tqdm bar.")
    # Fault-injection for tests: exit abruptly (like a kill) right after optimizer step N.
    g.add_argument("--_crash_after_steps", dest="crash_after_steps", type=int, default=None, help=argparse.SUPPRESS)
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments as a JSON-able dict (without the hidden test knobs)."""
    return {k: v for k, v in sorted(vars(args).items()) if k != "crash_after_steps"}


# ----------------------------------------------------------------------------------------------------------------
# Accelerator, model
# ----------------------------------------------------------------------------------------------------------------


def make_accelerator(args: argparse.Namespace):
    """An Accelerator with the run's precision and accumulation, and a sampler whose order depends on seed+epoch."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )


def load_model(auto_class: Any, name_or_path: str, init: str = "pretrained", **config_kwargs: Any) -> nn.Module:
    """Load ``name_or_path`` with ``auto_class`` in float32; ``init="scratch"`` keeps the config, not the weights."""
    from transformers import AutoConfig

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    if init == "scratch":
        return auto_class.from_config(config, dtype=torch.float32)
    return auto_class.from_pretrained(name_or_path, config=config, dtype=torch.float32)


def parse_scope(scope: str | Any) -> Any:
    """``--scope``: ``"ffn"``, ``"all"``, or comma-separated layer indices (``"0,1,5"``) -> a list of ints."""
    if not isinstance(scope, str) or scope in ("ffn", "all"):
        return scope
    try:
        return [int(part) for part in scope.split(",")]
    except ValueError:
        raise ValueError(f"--scope must be 'ffn', 'all' or layer indices such as '0,1,5', got {scope!r}") from None


def apply_activation(model: nn.Module, activation: str, alpha: float = 0.05, scope: Any = "ffn") -> dict[str, Any]:
    """Put ``activation`` (keep|relu|helu) into the model's FFN blocks (``scope``); return a JSON-able report.

    ``relu`` is HeLU patched in then swapped for ReLU (:func:`hf_helu.patching.unpatch_model`), so both
    touch exactly the same modules and config attribute.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "keep":
        return {"activation": "keep"}
    from hf_helu import patching

    report = patching.patch_model(model, alpha=alpha, scope=parse_scope(scope))
    if activation == "relu":
        report = patching.unpatch_model(model, to="relu")
    alpha_used = alpha if activation == "helu" else None
    return {"activation": activation, "alpha": alpha_used, "scope": scope, **_report(report)}


def _report(report: Any) -> dict[str, Any]:
    """A PatchReport (whatever its exact shape) as JSON-able data."""
    if hasattr(report, "to_dict"):
        return {"patch_report": report.to_dict()}
    if hasattr(report, "__dataclass_fields__"):
        import dataclasses

        return {"patch_report": json.loads(json.dumps(dataclasses.asdict(report), default=str))}
    return {"patch_report": str(report)}


def apply_lora(model: nn.Module, args: argparse.Namespace, task_type: str | None = None) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters from --lora_r/--lora_alpha/--lora_dropout/--lora_target_modules."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        task_type=task_type,
    )
    return get_peft_model(model, config)


def prepare_model(
    model: nn.Module, args: argparse.Namespace, lora_task_type: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Apply --activation then --lora to ``model``; return it with a description for results.json."""
    info = apply_activation(model, args.activation, args.alpha, args.scope)
    if getattr(args, "lora", False):
        model = apply_lora(model, args, lora_task_type)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info["lora"] = {"r": args.lora_r, "alpha": args.lora_alpha, "trainable_params": trainable}
    info["params"] = sum(p.numel() for p in model.parameters())
    return model, info


def create_optimizer_and_scheduler(
    model: nn.Module, args: argparse.Namespace, num_training_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on biases and LayerNorm weights) with linear warmup and decay."""
    from transformers import get_linear_schedule_with_warmup

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    warmup = math.ceil(args.warmup_ratio * num_training_steps)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, num_training_steps)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def default_eval_step(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Logits and labels of one batch (the classification/regression case)."""
    outputs = model(**batch)
    return {"predictions": outputs.logits, "labels": batch["labels"]}


def evaluate(
    accelerator: Any,
    model: nn.Module,
    dataloader: Any,
    compute_metrics: ComputeMetrics,
    eval_step: EvalStep = default_eval_step,
    monitor: Any = None,
) -> dict[str, float]:
    """Metrics over every sample of ``dataloader`` exactly once (gathered across processes).

    Adds ``num_samples`` (how many samples the metrics saw). ``monitor`` (an object with ``start()``/``stop()``,
    e.g. the dead-unit tracker) records only during this pass; the caller reads its statistics.
    """
    model.eval()
    gathered: dict[str, list] = {}
    if monitor is not None:
        monitor.start()
    try:
        with torch.no_grad():
            for batch in dataloader:
                for key, value in eval_step(model, batch).items():
                    if isinstance(value, torch.Tensor):
                        value = accelerator.gather_for_metrics(value.detach()).float().cpu().numpy()
                        gathered.setdefault(key, []).append(value)
                    else:
                        objects = accelerator.gather_for_metrics(list(value), use_gather_object=True)
                        gathered.setdefault(key, []).extend(objects)
    finally:
        if monitor is not None:
            monitor.stop()
    outputs = {k: np.concatenate(v) if v and isinstance(v[0], np.ndarray) else v for k, v in gathered.items()}
    metrics = {k: float(v) for k, v in compute_metrics(outputs).items()}
    metrics["num_samples"] = len(next(iter(outputs.values()))) if outputs else 0
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Dead-unit statistics (hf_helu.diagnostics, when present)
# ----------------------------------------------------------------------------------------------------------------


class _DeadUnitTracker:
    """Attach :class:`hf_helu.diagnostics.ActivationMonitor` for one eval pass, then reduce across processes."""

    def __init__(self, monitor: Any, accelerator: Any):
        self.monitor = monitor
        self.accelerator = accelerator

    @classmethod
    def create(cls, model: nn.Module, accelerator: Any, scope: str = "ffn") -> _DeadUnitTracker | None:
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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _checkpoint_step(path: Path) -> int:
    state = json.loads((path / STATE_FILE).read_text())
    return int(state["completed_steps"])


def find_checkpoint(output_dir: str | os.PathLike, which: str) -> Path:
    """Resolve --resume_from_checkpoint: a folder, or "latest" = the complete checkpoint with the most steps."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume_from_checkpoint {which!r} is not a checkpoint folder (no {STATE_FILE})")
        return path
    root = Path(output_dir) / CHECKPOINTS_DIR
    candidates = [p for p in root.glob("*") if not p.name.startswith(".") and (p / STATE_FILE).is_file()]
    if not candidates:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no checkpoint in {root}")
    return max(candidates, key=lambda p: (_checkpoint_step(p), p.stat().st_mtime))


def save_checkpoint(accelerator: Any, output_dir: Path, name: str, state: dict[str, Any]) -> Path:
    """``accelerator.save_state`` into a temp folder, then rename: a checkpoint folder is complete or absent."""
    root = output_dir / CHECKPOINTS_DIR
    final, tmp = root / name, root / f".{name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / STATE_FILE, state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------------------
# Saving the model
# ----------------------------------------------------------------------------------------------------------------


def _has_helu(model: nn.Module) -> bool:
    from hf_helu.activation import HeLU

    return any(isinstance(m, HeLU) for m in model.modules())


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
    with atomic_directory(path, overwrite=True) as tmp:
        unwrapped.save_pretrained(tmp, state_dict=state_dict)
        if processor is not None:
            processor.save_pretrained(tmp)
    exported = None
    if _has_helu(unwrapped):
        from hf_helu import patching

        relu_model = copy.deepcopy(unwrapped).cpu()
        result = patching.export_for_inference(relu_model)
        relu_model = result if isinstance(result, nn.Module) else relu_model
        exported = path.with_name(path.name + "_relu")
        with atomic_directory(exported, overwrite=True) as tmp:
            relu_model.save_pretrained(tmp)
            if processor is not None:
                processor.save_pretrained(tmp)
    accelerator.wait_for_everyone()
    return exported


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def _evaluate_all(accelerator, model, eval_dataloaders, compute_metrics, eval_step, tracker):
    metrics, dead = {}, None
    for i, (split, dataloader) in enumerate(eval_dataloaders.items()):
        monitor = tracker if (tracker is not None and i == 0) else None
        metrics[split] = evaluate(accelerator, model, dataloader, compute_metrics, eval_step, monitor)
        if monitor is not None:
            dead = {"split": split, **tracker.stats()}
    return metrics, dead


def _write_results(accelerator: Any, output_dir: Path, results: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        atomic_write_json(output_dir / RESULTS_FILE, results)


def _log_metrics(accelerator: Any, label: str, metrics: dict[str, dict[str, float]]) -> None:
    for split, values in metrics.items():
        text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        accelerator.print(f"[{label}] {split}: {text}")


def fit(
    accelerator: Any,
    model: nn.Module,
    train_dataloader: Any,
    eval_dataloaders: Mapping[str, Any],
    compute_metrics: ComputeMetrics,
    args: argparse.Namespace,
    *,
    eval_step: EvalStep = default_eval_step,
    processor: Any = None,
    config: dict[str, Any] | None = None,
    model_info: dict[str, Any] | None = None,
    optimizer_fn: Callable[..., tuple[torch.optim.Optimizer, Any]] | None = None,
    track_dead_units: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    compute_loss: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (unless ``args.eval_only``), evaluate, checkpoint, and write OUTPUT_DIR/results.json.

    Dataloaders and model are passed un-prepared; ``fit`` calls ``accelerator.prepare``. ``train_dataloader`` may
    be None with --eval_only. ``optimizer_fn(model, args, num_training_steps) -> (optimizer, lr_scheduler)``
    defaults to :func:`create_optimizer_and_scheduler`; ``config`` (default: :func:`run_config` of ``args``) and
    ``model_info`` (from :func:`prepare_model`) are recorded as they are. ``on_step(completed_steps, total_steps)``
    runs before the first step and after every optimizer step. ``compute_loss(model, batch)`` replaces the
    training loss ``model(**batch).loss`` (e.g. :class:`hf_helu.conversion.FFNDistiller`; ``train_loss`` then
    reports it). Returns the results dict.

    After a resume, the history comes from the checkpoint, and the resumed epoch's ``train_loss`` averages the
    batches run after the resume only; ``wall_time_s`` counts the time up to the checkpoint plus the resumed part.
    """
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    eval_dataloaders = dict(eval_dataloaders)
    if not eval_dataloaders:
        raise ValueError("fit needs at least one eval dataloader")
    results: dict[str, Any] = {
        "status": "running",
        "config": config if config is not None else run_config(args),
        "model": model_info or {},
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "epochs": [],
    }
    scope = getattr(args, "scope", "ffn")
    tracker = _DeadUnitTracker.create(model, accelerator, scope) if track_dead_units else None

    if args.eval_only:
        names = list(eval_dataloaders)
        model, *dls = accelerator.prepare(model, *eval_dataloaders.values())
        eval_dataloaders = dict(zip(names, dls, strict=True))
        start = time.perf_counter()
        metrics, dead = _evaluate_all(accelerator, model, eval_dataloaders, compute_metrics, eval_step, tracker)
        _log_metrics(accelerator, "eval", metrics)
        results.update(status="complete", final=metrics, dead_units=dead, wall_time_s=time.perf_counter() - start)
        _write_results(accelerator, output_dir, results)
        return results

    if train_dataloader is None:
        raise ValueError("fit needs a train dataloader unless --eval_only")
    checkpoints = output_dir / CHECKPOINTS_DIR
    if (
        not args.resume_from_checkpoint
        and not getattr(args, "overwrite_output_dir", False)
        and checkpoints.is_dir()
        and any(p for p in checkpoints.iterdir() if not p.name.startswith("."))
    ):
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints: pass --resume_from_checkpoint latest to continue that run, "
            "or --overwrite_output_dir to start afresh"
        )
    if getattr(args, "overwrite_output_dir", False) and accelerator.is_main_process:
        shutil.rmtree(checkpoints, ignore_errors=True)
    accelerator.wait_for_everyone()

    # Schedule from the un-prepared dataloader: the prepared scheduler steps once per process per optimizer step.
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    steps_per_epoch_local = math.ceil(steps_per_epoch / accelerator.num_processes)
    total_steps = args.epochs * steps_per_epoch_local
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    optimizer, lr_scheduler = (optimizer_fn or create_optimizer_and_scheduler)(
        model, args, total_steps * accelerator.num_processes
    )
    if getattr(train_dataloader, "generator", None) is None:
        # Each new DataLoader iterator draws a seed from its generator, else from the global torch RNG, which
        # would shift dropout after a resume (load_state restores that RNG before the epoch's iterator exists).
        train_dataloader.generator = torch.Generator().manual_seed(args.seed)
    names = list(eval_dataloaders)
    model, optimizer, train_dataloader, lr_scheduler, *dls = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler, *eval_dataloaders.values()
    )
    eval_dataloaders = dict(zip(names, dls, strict=True))
    steps_per_epoch_local = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)

    state = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "train_samples": 0, "wall_time_s": 0.0}
    if args.resume_from_checkpoint:
        path = find_checkpoint(output_dir, args.resume_from_checkpoint)
        accelerator.print(f"resuming from {path}")
        accelerator.load_state(str(path))
        saved = json.loads((path / STATE_FILE).read_text())
        state.update({k: saved[k] for k in state})
        results["epochs"] = saved.get("history", [])
        results["resumed_from"] = str(path)

    if on_step is not None:  # e.g. hf_helu.conversion.ActivationAnnealer.on_step (also after a resume)
        on_step(state["completed_steps"], total_steps)
    progress = tqdm(
        total=total_steps,
        initial=state["completed_steps"],
        disable=not accelerator.is_local_main_process or getattr(args, "no_progress", False),
        desc="train",
    )

    def checkpoint(name: str) -> None:
        save_checkpoint(accelerator, output_dir, name, {**state, "history": results["epochs"]})
        limit = getattr(args, "save_total_limit", None)
        if limit and accelerator.is_main_process:
            for old in checkpoint_names(output_dir)[:-limit]:
                shutil.rmtree(output_dir / CHECKPOINTS_DIR / old, ignore_errors=True)

    start = time.perf_counter() - state["wall_time_s"]
    done = state["completed_steps"] >= total_steps
    for epoch in range(state["epoch"], args.epochs):
        if done:
            break
        model.train()
        # The seedable sampler's order depends on seed + epoch only; a skipping loader must be told the epoch too.
        skip = state["batches_in_epoch"] if epoch == state["epoch"] else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        batches.set_epoch(epoch)
        loss_sum = torch.zeros((), device=accelerator.device)
        loss_count = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = compute_loss(model, batch) if compute_loss is not None else model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            loss_sum += loss.detach().float()
            loss_count += 1
            state["batches_in_epoch"] += 1
            state["train_samples"] += _batch_size(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state["completed_steps"] += 1
            if on_step is not None:
                on_step(state["completed_steps"], total_steps)
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if args.checkpointing_steps and state["completed_steps"] % args.checkpointing_steps == 0:
                state["wall_time_s"] = time.perf_counter() - start
                checkpoint(f"step_{state['completed_steps']}")
            if args.crash_after_steps is not None and state["completed_steps"] >= args.crash_after_steps:
                accelerator.print(f"simulated crash after step {state['completed_steps']}", flush=True)
                os._exit(3)
            if state["completed_steps"] >= total_steps:
                done = True
                break

        train_loss = accelerator.reduce(loss_sum, reduction="mean").item() / max(loss_count, 1)
        metrics, dead = _evaluate_all(accelerator, model, eval_dataloaders, compute_metrics, eval_step, tracker)
        _log_metrics(accelerator, f"epoch {epoch}", metrics)
        results["epochs"].append(
            {
                "epoch": epoch,
                "step": state["completed_steps"],
                "train_loss": train_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "eval": metrics,
                "dead_units": dead,
            }
        )
        state.update(epoch=epoch + 1, batches_in_epoch=0, wall_time_s=time.perf_counter() - start)
        _write_results(accelerator, output_dir, results)
        checkpoint(f"epoch_{epoch + 1}")
    progress.close()

    train_time = time.perf_counter() - start
    last = results["epochs"][-1] if results["epochs"] else None
    if last is None or last["step"] != state["completed_steps"]:  # resumed after the last epoch's checkpoint
        metrics, dead = _evaluate_all(accelerator, model, eval_dataloaders, compute_metrics, eval_step, tracker)
    else:
        metrics, dead = last["eval"], last["dead_units"]
    save_model(accelerator, model, output_dir / "model", processor)
    results.update(
        status="complete",
        final=metrics,
        dead_units=dead,
        completed_steps=state["completed_steps"],
        train_samples=state["train_samples"],
        wall_time_s=train_time,
        train_samples_per_s=state["train_samples"] / train_time if train_time > 0 else None,
        model_dir=str(output_dir / "model"),
        relu_export_dir=str(output_dir / "model_relu") if _has_helu(accelerator.unwrap_model(model)) else None,
    )
    _write_results(accelerator, output_dir, results)
    _log_metrics(accelerator, "final", metrics)
    return results


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 0


def checkpoint_names(output_dir: str | os.PathLike) -> list[str]:
    """Complete checkpoints in OUTPUT_DIR/checkpoints, oldest first (for tests and tooling)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if not p.name.startswith(".") and (p / STATE_FILE).is_file()]
    return sorted(names, key=lambda n: _checkpoint_step(root / n))


__all__ = [
    "ACTIVATIONS",
    "INITS",
    "RESULTS_FILE",
    "add_training_args",
    "apply_activation",
    "apply_lora",
    "checkpoint_names",
    "create_optimizer_and_scheduler",
    "default_eval_step",
    "evaluate",
    "find_checkpoint",
    "fit",
    "load_model",
    "make_accelerator",
    "parse_scope",
    "prepare_model",
    "run_config",
    "save_checkpoint",
    "save_model",
]


def end_processes() -> None:
    """Tear down ``torch.distributed`` at the end of a script: an undestroyed gloo group can abort at exit."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
