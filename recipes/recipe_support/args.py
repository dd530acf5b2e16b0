"""The recipes' flags, named as in transformers' ``examples/pytorch/*_no_trainer.py``, and the one check of their
values that every recipe runs before it loads anything."""

from __future__ import annotations

import argparse
import math
from typing import Any

from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.errors import UsageError
from hf_helu.inputs import alpha, fraction, positive_int

ACTIVATION_CHOICES = ("keep", "relu", "helu")  # keep the checkpoint's activation, or put ReLU / HeLU in its place
INITS = ("pretrained", "scratch")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def checkpointing_steps(value: str) -> str | int:
    """``--checkpointing_steps``: "epoch" or a number of optimizer steps."""
    return value if value == "epoch" else positive_int(value)


def add_training_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """Add the flags every training recipe shares to ``parser``; ``defaults`` overrides their default values."""
    g = parser.add_argument_group("training (the flag names of transformers' examples)")
    g.add_argument("--model_name_or_path", default=None, help="Local folder or hub id.")
    g.add_argument("--output_dir", default=None, help="A new or empty folder, or an earlier run's (one run at a time).")
    overwrite = (
        "Remove an earlier run's files from OUTPUT_DIR (or use a non-empty folder no run made, keeping its own)."
    )
    g.add_argument("--overwrite_output_dir", action="store_true", help=overwrite)
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
    g.add_argument("--checkpointing_steps", type=checkpointing_steps, default="epoch", help='"epoch" or N steps.')
    g.add_argument("--save_total_limit", type=positive_int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest" in OUTPUT_DIR.')
    g.add_argument("--with_tracking", action="store_true", help="Log the loss, lr and metrics to --report_to.")
    g.add_argument("--report_to", default="tensorboard", help='accelerate tracker(s): "tensorboard", ..., or "all".')
    g.add_argument("--push_to_hub", action="store_true", help="Upload the model (its stock-ReLU export if any).")
    g.add_argument("--hub_model_id", default=None, help="The hub repository (default: OUTPUT_DIR's name).")
    g.add_argument("--hub_token", default=None, help="Default: the token huggingface_hub finds (HF_TOKEN, login).")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    g.add_argument("--eval_only", action="store_true", help="Evaluate the model and write eval_results.json.")
    g.add_argument("--no_progress", action="store_true", help="No tqdm bars.")
    g.add_argument("--save_predictions", action="store_true", help="Also write each eval example's model output.")
    parser.set_defaults(**defaults)
    return parser


def check_training_args(args: argparse.Namespace) -> None:
    """Refuse hyperparameters that cannot train, a hub upload that cannot happen and an unknown tracker."""
    checks = {
        "--learning_rate": (args.learning_rate, 0 < args.learning_rate < math.inf, "a finite number > 0"),
        "--weight_decay": (args.weight_decay, 0 <= args.weight_decay < math.inf, "a finite number >= 0"),
        "--max_grad_norm": (clip := args.max_grad_norm, 0 <= clip < math.inf, "a finite number >= 0 (0: no clipping)"),
        "--num_warmup_steps": (args.num_warmup_steps, (args.num_warmup_steps or 0) >= 0, "an integer >= 0"),
    }
    for flag, (value, valid, expected) in checks.items():
        if not valid:
            raise UsageError(f"{flag} must be {expected}, got {value}")
    if (args.hub_model_id or args.hub_token) and not args.push_to_hub:
        raise UsageError("--hub_model_id / --hub_token name where to upload: add --push_to_hub")
    if args.push_to_hub and args.eval_only:
        raise UsageError("--push_to_hub uploads a trained model; --eval_only trains none")
    trackers(args, "logs")


def trackers(args: Any, logging_dir: str) -> list | None:
    """``--report_to`` as accelerate's trackers (with ``--with_tracking``); one that accelerate does not know or that
    is not installed is a UsageError (accelerate would drop it without a word)."""
    if not getattr(args, "with_tracking", False):
        return None
    from accelerate import PartialState
    from accelerate.tracking import filter_trackers

    PartialState()  # filter_trackers logs through accelerate's logger, which needs it
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
    g.add_argument("--lora_target_modules", nargs="+", default=None, help="Default: PEFT's choice for the model.")
    g.add_argument("--init", choices=INITS, default="pretrained", help="scratch: same config, random weights.")
    g.add_argument("--max_train_samples", type=positive_int, default=None)
    g.add_argument("--max_eval_samples", type=positive_int, default=None)
    return parser


def add_conversion_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--activation``, ``--alpha``, ``--conversion`` and its calibration, annealing and distillation knobs."""
    from hf_helu.conversion import CONVERSION_CHOICES, DEFAULT_ANNEAL_FRACTION, DEFAULT_RIDGE, RECOMMENDED_METHOD

    g = parser.add_argument_group("activation and its conversion (hf_helu.conversion)")
    g.add_argument("--activation", choices=ACTIVATION_CHOICES, default="keep", help="FFN activation to train with.")
    g.add_argument("--alpha", type=alpha, default=DEFAULT_ALPHA, help="HeLU margin: gradient passes where z > -alpha.")
    method = (  # the --conversion help
        f"With --activation relu|helu: refit the FFN output projections (calibrate), blend the original activation "
        f"into the new one over the first steps (anneal), or both. auto: {RECOMMENDED_METHOD} for a pretrained "
        "checkpoint whose FFN activation is not ReLU-like, else none (the naive swap)."
    )
    g.add_argument("--conversion", choices=CONVERSION_CHOICES, default="auto", help=method)
    g.add_argument("--anneal_fraction", type=float, default=DEFAULT_ANNEAL_FRACTION, help="Share of steps to blend.")
    g.add_argument("--calibration_samples", type=int, default=800, help="Unlabeled training examples to calibrate.")
    g.add_argument("--calibration_ridge", type=float, default=DEFAULT_RIDGE, help="Ridge lambda (x tokens).")
    g.add_argument("--distill_weight", type=float, default=0.0, help="> 0: add the FFN-output distillation term.")
    return parser


def check_conversion_args(args: argparse.Namespace) -> None:
    """Reject a ``--conversion`` / ``--distill_weight`` the run cannot honour, before anything is loaded."""
    from hf_helu.conversion import check_conversion_method, check_ridge

    check_conversion_method(args.conversion, allow_auto=True)
    if not 0 <= args.distill_weight < math.inf:
        raise UsageError(f"--distill_weight must be a finite number >= 0, got {args.distill_weight}")
    if args.distill_weight and args.eval_only:
        raise UsageError("--distill_weight applies to training; it cannot be combined with --eval_only")
    if args.conversion == "none":
        return
    if args.conversion != "auto" and args.activation not in ("relu", "helu"):  # auto resolves to none there
        raise UsageError(f"--conversion {args.conversion} needs --activation relu or helu, got {args.activation!r}")
    if args.conversion != "auto" and args.eval_only:
        raise UsageError("--conversion applies to training; it cannot be combined with --eval_only")
    if not 0 < args.anneal_fraction <= 1:
        raise UsageError(f"--anneal_fraction must be in (0, 1], got {args.anneal_fraction}")
    if args.calibration_samples < 1:
        raise UsageError(f"--calibration_samples must be >= 1, got {args.calibration_samples}")
    check_ridge(args.calibration_ridge)


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's arguments as a JSON-able dict (results.json ``config``), without ``--hub_token``."""
    return {key: value for key, value in sorted(vars(args).items()) if key != "hub_token"}


def lora_settings(args: argparse.Namespace, task_type: str | None = None) -> Any:
    """``--lora*`` as a PEFT ``LoraConfig`` (``task_type``), or None without ``--lora``."""
    if not args.lora:
        return None
    from peft import LoraConfig

    targets = args.lora_target_modules
    return LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
        task_type=task_type,
    )  # fmt: skip
