"""Fine-tune and evaluate a (HeLU-patched) encoder on a GLUE task with Accelerate.

    python recipes/run_glue.py --task rte --activation helu --epochs 1 --data_dir ../shared/data/glue
    accelerate launch recipes/run_glue.py --task mrpc ...       # several GPUs / processes (see `accelerate config`)
    python recipes/run_glue.py --task rte --eval_only --model runs/rte/model --data_dir ../shared/data/glue

Writes OUTPUT_DIR/results.json (per-epoch and final dev metrics, config, wall time, samples/s, dead FFN units),
OUTPUT_DIR/model (save_pretrained) and, with --activation helu, OUTPUT_DIR/model_relu (stock ReLU, loads
without hf_helu). Without --data_dir, GLUE comes from the hub (``nyu-mll/glue``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys

import datasets
import transformers
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

import hf_helu  # noqa: F401  (registers "helu" so patched checkpoints load)
from hf_helu import conversion
from hf_helu.training import glue
from hf_helu.training.args import (
    add_conversion_args,
    add_training_args,
    check_conversion_args,
    fit_config,
    lora_settings,
    run_config,
)
from hf_helu.training.loop import FitHooks, fit, make_accelerator
from hf_helu.training.models import prepare_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help=f"One of: {', '.join(glue.GLUE_TASKS)}.")
    parser.add_argument("--data_dir", default=None, help="Folder with <TASK>/{train,dev}.tsv; default: the hub.")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument(
        "--metric_backend",
        choices=("local", "evaluate"),
        default="local",
        help="local: scikit-learn/scipy (offline, same numbers); evaluate: evaluate.load('glue', task) (the hub).",
    )
    add_training_args(parser, output_dir=None, lr=5e-5, batch_size=32, epochs=3)
    add_conversion_args(parser)
    args = parser.parse_args(argv)
    check_conversion_args(args)
    args.task = glue.get_task(args.task).name  # unknown task: clear error before anything is loaded
    args.model = args.model or glue.default_model()
    method = ("" if args.conversion == "none" else f"_{args.conversion}") + (
        f"_distill{args.distill_weight:g}" if args.distill_weight else ""
    )
    args.output_dir = args.output_dir or f"runs/glue_{args.task}_{args.activation}{method}_s{args.seed}"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    accelerator = make_accelerator(args.mixed_precision, args.gradient_accumulation_steps, args.seed)
    set_seed(args.seed)
    task = glue.get_task(args.task)

    # Data: the same columns from the TSVs or the hub; fixed subsets so every activation sees the same rows.
    raw = glue.load_glue(task, args.data_dir)
    train_set = glue.shuffled_subset(raw["train"], args.max_train_samples)
    eval_sets = {split: glue.shuffled_subset(raw[split], args.max_eval_samples) for split in task.eval_splits}

    # Model: the pretrained encoder (or its config, --init scratch) with a head for the task, then HeLU / LoRA.
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = glue.load_glue_model(args.model, task, init=args.init, eval_only=args.eval_only)
    originals = conversion.original_activations(model) if args.conversion != "none" else None  # before patching
    teacher = copy.deepcopy(model) if args.distill_weight else None  # the frozen original, for --distill_weight
    model, model_info = prepare_model(
        model, args.activation, args.alpha, args.scope, lora=lora_settings(args, task_type="SEQ_CLS")
    )
    if model_info["activation"] != "keep":
        changed = len(model_info["patch_report"]["changed"])
        accelerator.print(f"activation: {model_info['activation']} in {changed} FFN module(s) (scope {args.scope})")

    with accelerator.main_process_first():
        train_set = glue.tokenize_glue(train_set, tokenizer, task, args.max_length)
        eval_sets = {k: glue.tokenize_glue(v, tokenizer, task, args.max_length) for k, v in eval_sets.items()}
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if args.mixed_precision != "no" else None)
    train_dataloader = DataLoader(train_set, shuffle=True, batch_size=args.batch_size, collate_fn=collator)
    eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    eval_dataloaders = {
        split: DataLoader(ds, batch_size=eval_batch_size, collate_fn=collator) for split, ds in eval_sets.items()
    }

    # Conversion of the pretrained activation: calibration now, annealing driven by the loop's steps.
    converted = None
    if args.conversion != "none":
        converted = conversion.apply_conversion(
            model.to(accelerator.device),
            args.conversion,
            originals,
            calibration_batches=conversion.dataset_batches(
                train_set, collator, args.calibration_samples, eval_batch_size
            ),
            ridge=args.calibration_ridge,
            anneal_fraction=args.anneal_fraction,
        )
        model_info["conversion"] = converted.to_dict()
        if converted.calibration is not None and accelerator.is_main_process:
            accelerator.print(converted.calibration)

    distiller = None
    if teacher is not None:
        teacher.to(accelerator.device)
        distiller = conversion.FFNDistiller(model, teacher, args.distill_weight, teacher_context=accelerator.autocast)
        model_info["distill_weight"] = args.distill_weight

    # Train, evaluate every epoch, checkpoint, save: all in the shared Accelerate loop.
    results = fit(
        accelerator,
        model,
        train_dataloader,
        eval_dataloaders,
        glue.make_compute_metrics(task, args.metric_backend),
        fit_config(args),
        hooks=FitHooks(
            on_step=converted.annealer.on_step if converted is not None and converted.annealer else None,
            compute_loss=distiller,
        ),
        processor=tokenizer,
        run_config=run_config(args),
        model_info=model_info,
    )
    for split, metrics in results["final"].items():
        accelerator.print(f"{task.name} {split}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    accelerator.print(f"results: {args.output_dir}/results.json")
    if not args.eval_only:
        accelerator.print(
            f"model: {results['model_dir']}"
            + (f", ReLU export: {results['relu_export_dir']}" if results.get("relu_export_dir") else "")
        )
    accelerator.end_training()
    return results


if __name__ == "__main__":
    try:
        main()
    except (glue.GlueDataError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
