"""The recipes' command-line flags, named as in transformers' ``examples/pytorch/*_no_trainer.py``, and the one
check of their values that every recipe runs before it loads anything.

- :func:`add_training_args` / :func:`check_training_args`: what every training recipe takes (model, output folder,
  optimizer and schedule, checkpoints and resume, trackers, the hub);
- :func:`add_model_args`: the fine-tuning recipes' activation scope, LoRA, initialisation and subsets;
- :func:`add_conversion_args` / :func:`check_conversion_args`: ``--activation``, ``--alpha``, ``--conversion`` and
  its calibration, annealing and distillation knobs;
- :func:`lora_settings`, :func:`run_config`: a parsed Namespace as what ``prepare_model`` and results.json take.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.errors import UsageError
from hf_helu.inputs import alpha, fraction, positive_int

ACTIVATION_CHOICES = ("keep", "relu", "helu")  # keep the checkpoint's activation, or put ReLU / HeLU in its place
INITS = ("pretrained", "scratch")
MIXED_PRECISION = ("no", "fp16", "bf16")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
EPOCH = "epoch"


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA adapters: rank, scaling, dropout, target modules (None: PEFT's choice) and PEFT task type."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: Sequence[str] | None = None
    task_type: str | None = None


def checkpointing_steps(value: str) -> str | int:
    """``--checkpointing_steps``: "epoch" or a number of optimizer steps."""
    return value if value == EPOCH else positive_int(value)


def add_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Add the flags every training recipe shares to ``parser``; ``defaults`` overrides their default values."""
    g = parser.add_argument_group("training (the flag names of transformers' examples)")
    g.add_argument("--model_name_or_path", default=None, help="Local folder or hub id.")
    g.add_argument(
        "--output_dir",
        default=None,
        help="Where checkpoints, results.json and the model go: a new or empty folder, or an earlier run's. One run "
        "at a time holds it.",
    )
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start afresh: remove an earlier run's files (checkpoints, model, model_relu, results) from OUTPUT_DIR; "
        "also use a non-empty folder no run made (its other files are kept).",
    )
    g.add_argument("--num_train_epochs", type=positive_int, default=3)
    g.add_argument("--max_train_steps", type=positive_int, default=None, help="Stop after this many optimizer steps.")
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--per_device_train_batch_size", type=positive_int, default=32)
    g.add_argument("--per_device_eval_batch_size", type=positive_int, default=None, help="Default: 2 x the train one.")
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="linear")
    g.add_argument("--num_warmup_steps", type=int, default=None, help="Default: --warmup_ratio of the steps.")
    g.add_argument("--warmup_ratio", type=fraction, default=0.1, help="Warmup share when --num_warmup_steps is unset.")
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument(
        "--checkpointing_steps",
        type=checkpointing_steps,
        default=EPOCH,
        help='"epoch": a checkpoint at each epoch end; N: also one every N optimizer steps.',
    )
    g.add_argument("--save_total_limit", type=positive_int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='A checkpoint folder, or "latest" for the newest one in OUTPUT_DIR/checkpoints.',
    )
    g.add_argument("--with_tracking", action="store_true", help="Log the loss, lr and metrics to --report_to.")
    g.add_argument(
        "--report_to", default="tensorboard", help='accelerate tracker(s): "tensorboard", "wandb", ..., or "all".'
    )
    g.add_argument(
        "--push_to_hub", action="store_true", help="Upload the model (its stock-ReLU export if any) at the end."
    )
    g.add_argument("--hub_model_id", default=None, help="The hub repository (default: OUTPUT_DIR's name).")
    g.add_argument("--hub_token", default=None, help="Default: the token huggingface_hub finds (HF_TOKEN, login).")
    g.add_argument("--mixed_precision", choices=MIXED_PRECISION, default="no")
    g.add_argument("--eval_only", action="store_true", help="Evaluate the model and write eval_results.json.")
    g.add_argument("--no_progress", action="store_true", help="No tqdm bars.")
    g.add_argument(
        "--save_predictions",
        action="store_true",
        help="Also write OUTPUT_DIR/predictions.json (--eval_only: eval_predictions.json): each eval example's model "
        "output (logits, or the regression score), per split, in dataset order.",
    )
    if defaults:
        parser.set_defaults(**defaults)
    return parser


def check_training_args(args: argparse.Namespace) -> None:
    """Refuse a learning rate, weight decay, clipping norm or warmup that cannot train, and a hub upload that cannot
    happen, before anything is loaded (the warmup ratio is checked by its argparse type: a number in [0, 1))."""
    checks = {
        "--learning_rate": (args.learning_rate, lambda v: 0 < v < math.inf, "a finite number > 0"),
        "--weight_decay": (args.weight_decay, lambda v: 0 <= v < math.inf, "a finite number >= 0"),
        "--max_grad_norm": (args.max_grad_norm, lambda v: 0 <= v < math.inf, "a finite number >= 0 (0: no clipping)"),
        "--num_warmup_steps": (args.num_warmup_steps, lambda v: v >= 0, "an integer >= 0"),
    }
    for flag, (value, valid, expected) in checks.items():
        if value is not None and not valid(value):
            raise UsageError(f"{flag} must be {expected}, got {value}")
    if (args.hub_model_id or args.hub_token) and not args.push_to_hub:
        raise UsageError("--hub_model_id / --hub_token name where to upload: add --push_to_hub")
    if args.push_to_hub and args.eval_only:
        raise UsageError("--push_to_hub uploads a trained model; --eval_only trains none")
    trackers(args, "logs")


def trackers(args: Any, logging_dir: str) -> list | None:
    """``--report_to`` (comma-separated) as accelerate's trackers, with ``--with_tracking``; one that accelerate does
    not know, or that is not installed, is a UsageError (accelerate would drop it without a word)."""
    if not getattr(args, "with_tracking", False):
        return None
    from accelerate import PartialState
    from accelerate.tracking import filter_trackers

    PartialState()  # accelerate's logging, which filter_trackers uses, needs it (Accelerator would make it anyway)
    names = [name.strip() for name in args.report_to.split(",")]
    try:
        found = filter_trackers(names, logging_dir)
    except ValueError as error:
        raise UsageError(f"--report_to {args.report_to}: {error}") from None
    missing = [name for name in names if name != "all" and name not in map(str, found)]
    if missing or not found:
        raise UsageError(f"--report_to {args.report_to}: {', '.join(missing) or 'no tracker'} is not installed")
    return found


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The encoder recipes' (run_glue, run_speech) scope, LoRA, initialisation and subset flags."""
    g = parser.add_argument_group("model (recipe_support.models)")
    g.add_argument("--scope", default="ffn", help='Which activations to patch: "ffn", "all" or layers "0,1,5".')
    g.add_argument("--lora", action="store_true", help="Train PEFT LoRA adapters instead of all weights.")
    g.add_argument("--lora_r", type=positive_int, default=8)
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument("--lora_dropout", type=float, default=0.1)
    g.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=None,
        help="Module names for LoRA (default: PEFT's choice for the architecture).",
    )
    g.add_argument("--init", choices=INITS, default="pretrained", help="scratch: same config, random weights.")
    g.add_argument("--max_train_samples", type=positive_int, default=None)
    g.add_argument("--max_eval_samples", type=positive_int, default=None)
    return parser


def add_conversion_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The conversion flags of a recipe: ``--conversion``, the calibration and annealing knobs, ``--distill_weight``."""
    from hf_helu.conversion import CONVERSION_CHOICES, DEFAULT_ANNEAL_FRACTION, DEFAULT_RIDGE, RECOMMENDED_METHOD

    group = parser.add_argument_group("activation and its conversion (hf_helu.conversion)")
    group.add_argument("--activation", choices=ACTIVATION_CHOICES, default="keep", help="FFN activation to train with.")
    group.add_argument(
        "--alpha", type=alpha, default=DEFAULT_ALPHA, help="HeLU margin: gradient passes where z > -alpha."
    )
    group.add_argument(
        "--conversion",
        choices=CONVERSION_CHOICES,
        default="auto",
        help=f"With --activation relu|helu: refit the FFN output projections at patch time (calibrate), blend the "
        f"original activation into the new one over the first steps (anneal), or both. auto (default): "
        f"{RECOMMENDED_METHOD} for a pretrained checkpoint whose FFN activation is not ReLU-like, else none "
        "(--init scratch, --activation keep, a ReLU/HeLU checkpoint, --eval_only); results.json records the choice "
        "and why. none: the naive swap.",
    )
    group.add_argument(
        "--anneal_fraction",
        type=float,
        default=DEFAULT_ANNEAL_FRACTION,
        help="Fraction of the optimizer steps over which the blend goes from the original activation to HeLU.",
    )
    group.add_argument(
        "--calibration_samples", type=int, default=800, help="Unlabeled training examples for calibration."
    )
    group.add_argument("--calibration_ridge", type=float, default=DEFAULT_RIDGE, help="Ridge lambda (x tokens).")
    group.add_argument(
        "--distill_weight",
        type=float,
        default=0.0,
        help="> 0: add this times the FFN-output distillation term from a frozen copy of the original model "
        "(hf_helu.conversion.FFNDistiller) to the training loss. 0 (default): off.",
    )
    return parser


def check_conversion_args(args: argparse.Namespace) -> None:
    """Reject a ``--conversion`` / ``--distill_weight`` the run cannot honour, before anything is loaded.

    ``args`` holds the flags of both :func:`add_training_args` and :func:`add_conversion_args`.
    """
    from hf_helu.conversion import check_conversion_method, check_ridge

    check_conversion_method(args.conversion, allow_auto=True)
    if not 0 <= args.distill_weight < math.inf:
        raise UsageError(f"--distill_weight must be a finite number >= 0, got {args.distill_weight}")
    if args.distill_weight and args.eval_only:
        raise UsageError("--distill_weight applies to training; it cannot be combined with --eval_only")
    if args.conversion == "none":
        return
    if args.conversion != "auto":  # auto resolves to none where an explicit method would be refused here
        _check_explicit_conversion(args)
    if not 0 < args.anneal_fraction <= 1:
        raise UsageError(f"--anneal_fraction must be in (0, 1], got {args.anneal_fraction}")
    if args.calibration_samples < 1:
        raise UsageError(f"--calibration_samples must be >= 1, got {args.calibration_samples}")
    check_ridge(args.calibration_ridge)


def _check_explicit_conversion(args: argparse.Namespace) -> None:
    if args.activation not in ("relu", "helu"):
        raise UsageError(f"--conversion {args.conversion} needs --activation relu or helu, got {args.activation!r}")
    if args.eval_only:
        raise UsageError("--conversion applies to training; it cannot be combined with --eval_only")


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments as a JSON-able dict (results.json ``config``), without ``--hub_token``."""
    return {key: value for key, value in sorted(vars(args).items()) if key != "hub_token"}


def lora_settings(args: argparse.Namespace, task_type: str | None = None) -> LoraSettings | None:
    """``--lora*`` as :class:`LoraSettings` (PEFT ``task_type``), or None without ``--lora``."""
    if not args.lora:
        return None
    return LoraSettings(
        r=args.lora_r,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        task_type=task_type,
    )


__all__ = [
    "ACTIVATION_CHOICES",
    "INITS",
    "MIXED_PRECISION",
    "SCHEDULERS",
    "LoraSettings",
    "add_conversion_args",
    "add_model_args",
    "add_training_args",
    "check_conversion_args",
    "check_training_args",
    "checkpointing_steps",
    "lora_settings",
    "run_config",
    "trackers",
]
