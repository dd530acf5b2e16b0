"""Fine-tune and evaluate a (HeLU-patched) encoder on a GLUE task with Accelerate.

    python recipes/run_glue.py --task rte --activation helu --num_train_epochs 1 --data_dir ../shared/data/glue
    accelerate launch recipes/run_glue.py --task mrpc --data_dir ../shared/data/glue   # several GPUs / processes
    python recipes/run_glue.py --task rte --eval_only --model_name_or_path runs/rte/model --data_dir ../shared/data/glue

Writes OUTPUT_DIR/results.json (per-epoch and final dev metrics, config, wall time, samples/s, dead FFN units),
OUTPUT_DIR/model (save_pretrained, with a model card) and, with --activation helu, OUTPUT_DIR/model_relu (stock
ReLU, loads without hf_helu); --eval_only writes OUTPUT_DIR/eval_results.json. OUTPUT_DIR must be new, empty or an
earlier run's (then --resume_from_checkpoint latest or --overwrite_output_dir); one run at a time holds it.
Without --data_dir, GLUE comes from the hub (``nyu-mll/glue``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from accelerate.utils import set_seed
from recipe_support import glue
from recipe_support.args import (
    add_conversion_args,
    add_model_args,
    add_training_args,
    check_conversion_args,
    check_training_args,
    lora_settings,
    run_config,
)
from recipe_support.evaluation import default_eval_step, evaluate_only, make_evaluator
from recipe_support.models import check_model_source, check_stock_export, prepare_model
from recipe_support.output_dir import start_run
from recipe_support.results import RESULTS_FILE, finish_training, new_results, publish, results_file, write_results
from recipe_support.training import train, with_progress
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

import hf_helu  # noqa: F401  (registers "helu" so patched checkpoints load)
from hf_helu import conversion
from hf_helu.errors import UsageError
from hf_helu.inputs import positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, help=f"One of: {', '.join(glue.GLUE_TASKS)}.")
    parser.add_argument("--data_dir", default=None, help="Folder with <TASK>/{train,dev}.tsv; default: the hub.")
    parser.add_argument("--max_length", type=positive_int, default=128, help="Truncate to this many tokens.")
    parser.add_argument(
        "--metric_backend",
        choices=("local", "evaluate"),
        default="local",
        help="local: scikit-learn/scipy (offline, same numbers); evaluate: evaluate.load('glue', task) (the hub).",
    )
    add_training_args(parser)
    add_model_args(parser)
    add_conversion_args(parser)
    report = parser.add_argument_group("judging the result")
    report.add_argument(
        "--compare_keep",
        action="store_true",
        help="Then fine-tune the unpatched checkpoint (--activation keep) with the same data, budget and seed, into "
        "OUTPUT_DIR_keep, and print its dev score beside this run's (one process only).",
    )
    report.add_argument(
        "--check_export",
        action="store_true",
        help="Load OUTPUT_DIR/model_relu in a Python process that never imports hf_helu and compare its dev "
        "predictions with the trained model's (recorded in results.json as export_check).",
    )
    args = parser.parse_args(argv)
    check_training_args(args)
    check_conversion_args(args)
    if args.compare_keep and args.push_to_hub:
        raise UsageError("--compare_keep makes two models; push one run's model with --push_to_hub, without it")
    if args.compare_keep and (args.eval_only or args.activation == "keep"):
        raise UsageError("--compare_keep compares a relu/helu training run with keep; drop it for this run")
    if args.compare_keep and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--compare_keep runs in one process; launch without accelerate/torchrun")
    args.task = glue.get_task(args.task).name  # unknown task: clear error before anything is loaded
    args.model_name_or_path = args.model_name_or_path or glue.default_model()
    # A missing folder, a file, a speech checkpoint: refused before any loading.
    check_model_source(
        args.model_name_or_path, ("SEQUENCE_CLASSIFICATION",), "a text encoder with a sequence-classification head"
    )
    method = ("" if args.conversion == "auto" else f"_{args.conversion}") + (
        f"_distill{args.distill_weight:g}" if args.distill_weight else ""
    )
    args.output_dir = args.output_dir or f"runs/glue_{args.task}_{args.activation}{method}_s{args.seed}"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Logs, the accelerator, OUTPUT_DIR claimed, the checkpoint and the hub checked: before any data or model loads.
    with start_run(args, __file__, argv, inputs=[args.model_name_or_path]) as accelerator:
        results = _run(args, accelerator)
    baseline = _run_keep_baseline(args, sys.argv[1:] if argv is None else argv) if args.compare_keep else None
    if accelerator.is_main_process:
        _print_summary(args, results, baseline)
    return results


def _run(args: argparse.Namespace, accelerator) -> dict:
    set_seed(args.seed)
    task = glue.get_task(args.task)

    # Data: the same columns from the TSVs or the hub; fixed subsets so every activation sees the same rows.
    raw = glue.load_glue(task, args.data_dir)
    train_set = glue.shuffled_subset(raw["train"], args.max_train_samples)
    eval_sets = {split: glue.shuffled_subset(raw[split], args.max_eval_samples) for split in task.eval_splits}

    # Model: the pretrained encoder (or its config, --init scratch) with a head for the task, then HeLU / LoRA.
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    model = glue.load_glue_model(args.model_name_or_path, task, init=args.init, eval_only=args.eval_only)
    # --conversion auto: calibrate+anneal for a pretrained non-ReLU checkpoint patched to relu/helu, else none.
    choice = conversion.resolve_conversion(
        args.conversion, activation=args.activation, model=model, init=args.init, training=not args.eval_only
    )
    originals = conversion.original_activations(model) if choice.method != "none" else None  # before patching
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
    # Its own generator: a new epoch's iterator seeds from it, not from the global RNG a resume restores.
    train_dataloader = DataLoader(
        train_set,
        shuffle=True,
        batch_size=args.per_device_train_batch_size,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(args.seed),
    )
    eval_batch_size = args.per_device_eval_batch_size or 2 * args.per_device_train_batch_size
    eval_dataloaders = {
        split: DataLoader(ds, batch_size=eval_batch_size, collate_fn=collator) for split, ds in eval_sets.items()
    }

    # Conversion of the pretrained activation: calibration now, annealing driven by the loop's steps.
    calibration_set = None
    if "calibrate" in choice.method:
        calibration_set = conversion.dataset_batches(train_set, collator, args.calibration_samples, eval_batch_size)
    converted = _convert(args, accelerator, model, choice, originals, calibration_set, model_info)

    distiller = None
    if teacher is not None:
        teacher.to(accelerator.device)
        distiller = conversion.FFNDistiller(model, teacher, args.distill_weight, teacher_context=accelerator.autocast)
        model_info["distill_weight"] = args.distill_weight

    results = new_results(accelerator, run_config(args), model_info)
    compute_metrics = glue.make_compute_metrics(task, args.metric_backend)
    evaluator = make_evaluator(accelerator, model, compute_metrics, default_eval_step, args.scope)
    if args.eval_only:
        model, *loaders = accelerator.prepare(model, *eval_dataloaders.values())
        eval_dataloaders = dict(zip(eval_dataloaders, loaders, strict=True))
        results = evaluate_only(
            accelerator, model, with_progress(args, accelerator, eval_dataloaders), evaluator, args, results
        )
    else:
        # The loop (recipe_support.training.train): epochs of optimizer steps, an evaluation and a checkpoint each.
        annealer = converted.annealer if converted is not None else None
        model, eval_dataloaders, state = train(
            args, accelerator, model, train_dataloader, eval_dataloaders, evaluator, results,
            annealer=annealer, compute_loss=distiller,
        )  # fmt: skip
        # The final metrics, the model (and its stock-ReLU export) with model cards, results.json.
        results = finish_training(accelerator, model, evaluator, eval_dataloaders, state, results, args, tokenizer)
        publish(accelerator, args, args.model_name_or_path, results, results["final"])
    _add_baselines(args, accelerator, task, model, results, train_set, eval_sets, eval_dataloaders)
    write_results(accelerator, Path(args.output_dir), results, results_file(args.eval_only))
    accelerator.print(f"results: {args.output_dir}/{results_file(args.eval_only)}")  # the metrics: printed above
    if not args.eval_only:
        accelerator.print(f"model: {results['model_dir']}, its stock-ReLU export: {results['relu_export_dir']}")
    return results


def _convert(args, accelerator, model, choice, originals, calibration_set, model_info: dict):
    """Apply the resolved conversion method (calibrate now; the returned result's annealer follows the steps)."""
    model_info["conversion"] = choice.to_dict()
    accelerator.print(f"conversion: {choice.method} ({choice.reason})")
    if choice.method == "none":
        return None
    converted = conversion.apply_conversion(
        model.to(accelerator.device),
        choice.method,
        originals,
        calibration_batches=calibration_set,
        ridge=args.calibration_ridge,
        anneal_fraction=args.anneal_fraction,
    )
    converted.choice = choice
    model_info["conversion"] = converted.to_dict()
    if converted.calibration is not None and accelerator.is_main_process:
        accelerator.print(converted.calibration)
    return converted


def _add_baselines(args, accelerator, task, model, results: dict, train_set, eval_sets, eval_dataloaders) -> None:
    """results.json's majority-class scores and, with --check_export, the stock-transformers check of model_relu."""
    if not args.eval_only and not task.is_regression:
        results["majority_class"] = {
            split: majority_class_score(task, train_set["labels"], ds["labels"]) for split, ds in eval_sets.items()
        }
    if args.check_export and results.get("relu_export_dir") and accelerator.is_main_process:
        results["export_check"] = check_stock_export(
            results["relu_export_dir"],
            accelerator.unwrap_model(model),
            next(iter(eval_dataloaders.values())),
            regression=task.is_regression,
        )


def majority_class_score(task: glue.GlueTask, train_labels, eval_labels) -> dict:
    """The GLUE score of always predicting the training set's most frequent class on ``eval_labels``."""
    label = Counter(int(y) for y in train_labels).most_common(1)[0][0]
    metrics = glue.glue_metrics(task, [label] * len(eval_labels), [int(y) for y in eval_labels])
    return {"label": task.label_names[label], "score": glue.glue_score(task, metrics)}


def _run_keep_baseline(args: argparse.Namespace, argv: list[str]) -> dict:
    """This run's command with ``--activation keep`` into OUTPUT_DIR_keep, in a child process; its results."""
    out = f"{str(args.output_dir).rstrip('/')}_keep"
    own = {"--compare_keep", "--check_export"}
    command = [sys.executable, str(Path(__file__).resolve()), *(a for a in argv if a not in own)]
    command += ["--activation", "keep", "--conversion", "auto", "--output_dir", out, "--overwrite_output_dir"]
    print(f"\n--compare_keep: the same fine-tuning with the checkpoint's own activation, into {out}", flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the --compare_keep run failed (exit status {done.returncode})")
    return json.loads((Path(out) / RESULTS_FILE).read_text())


def _print_summary(args: argparse.Namespace, results: dict, baseline: dict | None) -> None:
    """One line per dev split a newcomer can judge: this score, the kept activation's, the majority class's."""
    if args.eval_only:
        return
    method = results["model"]["conversion"]["method"]
    print(f"\n== {args.task}: {args.activation} (conversion {method}), {results['completed_steps']} steps ==")
    for split, metrics in results["final"].items():
        parts = [f"{args.activation} {metrics['score']:.1f}"]
        if baseline is not None:
            parts.append(f"keep (the checkpoint's activation, same budget) {baseline['final'][split]['score']:.1f}")
        if split in results.get("majority_class", {}):
            majority = results["majority_class"][split]
            parts.append(f"majority class ({majority['label']}) {majority['score']:.1f}")
        print(f"{split} score x100: " + " | ".join(parts))
    check = results.get("export_check")
    if check is not None:
        print(
            f"{results['relu_export_dir']}: stock transformers, no hf_helu: same prediction on "
            f"{check['same_predictions']}/{check['examples']} dev examples (max |logit diff| "
            f"{check['max_abs_logit_diff']:.2g})"
        )


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line; any other exception is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
