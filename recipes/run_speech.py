"""Train and evaluate Wav2Vec2 or Whisper with HeLU on speech: keyword/digit classification or speech recognition.

An Accelerate script (no Trainer) with its own training loop::

    # From scratch on the Free Spoken Digit Dataset (offline), HeLU in the FFN blocks:
    python recipes/run_speech.py --task classify --dataset ../shared/data/fsdd --init scratch --model_size small \\
        --activation helu --num_train_epochs 5 --output_dir runs/fsdd_helu

    # Character CTC recognition of the spoken digit words:
    python recipes/run_speech.py --task asr --dataset ../shared/data/fsdd --init scratch --activation helu

    # Pretrained wav2vec2-base on a hub dataset (online):
    accelerate launch recipes/run_speech.py --task classify --model_name_or_path facebook/wav2vec2-base \\
        --dataset superb --dataset_config ks --activation helu

    # Whisper tiny.en (the model class comes from the checkpoint's config), a 3 s encoder window, HeLU in its
    # encoder and decoder FFNs, converted (--conversion auto: calibrate+anneal); evaluation by generate:
    python recipes/run_speech.py --task asr --model_name_or_path ../shared/data/whisper-tiny.en --encoder_seconds 3 \\
        --activation helu --num_train_epochs 1 --per_device_train_batch_size 8 --learning_rate 1e-5 \\
        --output_dir runs/fsdd_whisper_helu

    # Evaluate a saved model:
    python recipes/run_speech.py --task classify --eval_only --model_name_or_path runs/fsdd_helu/model \\
        --dataset ../shared/data/fsdd

``--dataset`` is a local folder (FSDD, or the ``datasets`` audiofolder convention) or a hub id; a folder without an
eval split gets a stratified held-out split (``--eval_fraction``, ``--split_seed``, recorded in results.json).
OUTPUT_DIR/results.json holds the run config, per-epoch and final metrics (classify: accuracy and loss; asr: WER,
CER, exact-match rate and loss), dead-unit statistics, wall time and the number of processes.
User errors (bad data, bad flags) print ``error: ...`` and exit 2 before any training.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from recipe_support import speech
from recipe_support.args import (
    add_conversion_args,
    add_model_args,
    add_training_args,
    check_conversion_args,
    check_training_args,
    lora_settings,
    run_config,
)
from recipe_support.evaluation import evaluate_only, make_evaluator
from recipe_support.models import check_model_source, prepare_model, trainable_parameters
from recipe_support.output_dir import claim_output_dir
from recipe_support.paths import DATA_DIR_ENV, data_path
from recipe_support.results import check_hub, command_line, finish_training, new_results, publish
from recipe_support.training import check_checkpoint, make_accelerator, start_tracking, train, with_progress

import hf_helu  # noqa: F401  (registers "helu" in transformers' ACT2FN, for checkpoints that use it)
from hf_helu import conversion
from hf_helu.errors import UsageError
from hf_helu.inputs import fraction, positive_int

logger = logging.getLogger("speech")

DEFAULT_PRETRAINED = "facebook/wav2vec2-base"
DEFAULT_LR = {"scratch": 1e-3, "pretrained": 5e-5}
LORA_TARGET_MODULES = ("q_proj", "v_proj")  # Wav2Vec2/HuBERT/WavLM attention projections


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("classify", "asr"), default="classify")
    parser.add_argument("--dataset", help="FSDD or audiofolder folder, or a hub id (default: $HF_HELU_DATA_DIR/fsdd).")
    parser.add_argument("--dataset_config", default=None, help="Hub dataset config name (e.g. 'ks' for superb).")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default=None, help="Default: validation, valid, dev or test, if present.")
    parser.add_argument("--label_column", default="label", help="Hub datasets: class label column.")
    parser.add_argument("--text_column", default=None, help="Hub datasets: transcript column (default: guessed).")
    parser.add_argument(
        "--max_seconds",
        type=float,
        default=16.0,
        help="Clip-length cap: classify truncates longer clips; asr refuses them (a cut transcript is wrong).",
    )
    parser.add_argument("--model_size", choices=sorted(speech.SIZES), default="small", help="--init scratch only.")
    parser.add_argument(
        "--config_overrides", default=None, help='Config changes, e.g. "hidden_size=64,num_hidden_layers=2".'
    )
    parser.add_argument(
        "--freeze_feature_encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Freeze the conv feature encoder (default: yes for a pretrained Wav2Vec2, else no).",
    )
    parser.add_argument("--eval_fraction", type=fraction, default=0.2, help="No eval split: hold out this fraction.")
    parser.add_argument("--split_seed", type=int, default=0, help="Seed of that stratified held-out split.")
    parser.add_argument("--eval_stride", type=positive_int, default=None, help="Keep every Nth eval clip, in order.")
    parser.add_argument(
        "--encoder_seconds",
        type=float,
        default=None,
        help="Whisper: keep only this window of the encoder (50 positions per second; default: the checkpoint's).",
    )
    parser.add_argument("--generation_max_tokens", type=positive_int, default=64, help="Whisper asr: generate cap.")
    add_training_args(parser, learning_rate=None, per_device_train_batch_size=16)
    add_model_args(parser)
    add_conversion_args(parser)
    args = parser.parse_args(argv)
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LR[args.init]
    check_training_args(args)
    check_conversion_args(args)
    if not args.max_seconds > 0:
        parser.error(f"--max_seconds must be > 0, got {args.max_seconds}")
    if args.model_name_or_path is None and args.init == "pretrained":
        args.model_name_or_path = DEFAULT_PRETRAINED
    args.output_dir = args.output_dir or f"runs/speech_{args.task}_{args.activation}_s{args.seed}"
    if args.lora and not args.lora_target_modules:
        args.lora_target_modules = list(LORA_TARGET_MODULES)
    fsdd = data_path("fsdd")
    if args.dataset is None and (fsdd is None or not fsdd.is_dir()):
        parser.error(f"--dataset is required (no FSDD folder in ${DATA_DIR_ENV})")
    args.dataset = args.dataset or str(fsdd)
    if args.config_overrides and args.model_name_or_path is not None:
        parser.error("--config_overrides applies to a scratch model built from --model_size; drop --model_name_or_path")
    if args.model_name_or_path is not None:  # a missing folder, a file, a text checkpoint: refused before any loading
        kinds = ("AUDIO_CLASSIFICATION", "CTC", "SPEECH_SEQ_2_SEQ")
        check_model_source(args.model_name_or_path, kinds, "a speech model (Wav2Vec2-style or Whisper)")
    return args


# --- model and processor -------------------------------------------------------------------------


def model_config(args: argparse.Namespace):
    from transformers import AutoConfig

    if args.model_name_or_path is None:
        return speech.scratch_config(args.model_size, args.config_overrides)
    return AutoConfig.from_pretrained(args.model_name_or_path)


# --- data ----------------------------------------------------------------------------------------


def load_clips(args: argparse.Namespace) -> tuple[list[speech.Clip], list[speech.Clip], list[speech.Clip], dict]:
    """(the whole train split, its clips used for training, the eval clips, where they come from); a local dataset
    with a train split only gets a stratified held-out eval split.

    Labels and the CTC vocabulary come from the whole train split, so a --max_train_samples subset that
    happens to miss a class or a character still builds the same model head.
    """
    local = Path(args.dataset).is_dir()
    columns = {} if local else {"label_column": args.label_column, "text_column": args.text_column}
    splits = speech.load_splits(args.dataset, args.dataset_config, **columns)
    held_out = None
    if local and args.eval_split is None and set(splits) == {args.train_split}:
        train_part, eval_part, held_out = speech.stratified_split(
            splits[args.train_split], args.eval_fraction, args.split_seed
        )
        splits = {args.train_split: train_part, speech.HELD_OUT_SPLIT: eval_part}
    eval_split = speech.pick_eval_split(splits, args.eval_split or (held_out and speech.HELD_OUT_SPLIT))
    if not args.eval_only and args.train_split not in splits:
        raise UsageError(f"train split {args.train_split!r} not in the dataset's splits {sorted(splits)}")
    # A fixed subsampling seed: every --seed of a comparison sees the same clips. With --eval_only the training
    # clips are not decoded; they only give a scratch model its labels or vocabulary.
    train_split = splits.get(args.train_split, [])
    train = speech.subset_in_order(train_split, args.max_train_samples)
    eval_clips = speech.subset_in_order(splits[eval_split][:: args.eval_stride or 1], args.max_eval_samples)
    data = {"train_clips": len(train), "eval_clips": len(eval_clips), "eval_split": eval_split}
    return train_split, train, eval_clips, {**data, "held_out_split": held_out}


def build_model(
    args: argparse.Namespace, config, setup: speech.TaskSetup
) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """The task's float32 model (Whisper: its encoder window cut to --encoder_seconds) with HeLU / LoRA (the new head
    trained in full), its model_info, and the conversion state: (original activations, the frozen teacher, the
    resolved conversion choice)."""
    scratch = config if args.model_name_or_path is None else None
    model = speech.build_model(
        args.task, model_name_or_path=args.model_name_or_path, init=args.init, config=scratch, **setup.head
    )
    if args.encoder_seconds is not None:
        speech.shorten_encoder(model, args.encoder_seconds)
    if args.freeze_feature_encoder and config.model_type == "whisper":  # Whisper's counterpart: the encoder's convs
        model.get_encoder().conv1.requires_grad_(False)
        model.get_encoder().conv2.requires_grad_(False)
    elif args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    choice = conversion.resolve_conversion(
        args.conversion, activation=args.activation, model=model, init=args.init, training=not args.eval_only
    )
    originals = conversion.original_activations(model) if choice.method != "none" else None  # before patching
    teacher = copy.deepcopy(model) if args.distill_weight else None
    model, model_info = prepare_model(model, args.activation, args.alpha, args.scope, lora=lora_settings(args))
    model_info["conversion_choice"] = choice.to_dict()
    if args.lora:  # the task's new head is trained in full (Whisper asr has none)
        heads = (".projector.", ".classifier.") if args.task == "classify" else (".lm_head.",)
        for name, param in model.named_parameters():
            param.requires_grad_(param.requires_grad or any(head in f".{name}" for head in heads))
        model_info["lora"]["trainable_params"] = trainable_parameters(model)
    return model, model_info, (originals, teacher, choice)


# --- conversion ----------------------------------------------------------------------------------


def convert(args, accelerator, model, setup, train_data, state, model_info) -> tuple[Any, Any]:
    """Calibrate / set up annealing (the resolved method) and the distiller; returns (annealer, compute_loss)."""
    originals, teacher, choice = state
    annealer = None
    if choice.method != "none":
        converted = conversion.apply_conversion(
            model.to(accelerator.device),
            choice.method,
            originals,
            calibration_batches=speech.calibration_batches(
                train_data,
                setup.collator,
                args.calibration_samples,
                args.per_device_eval_batch_size or 2 * args.per_device_train_batch_size,
            ),
            ridge=args.calibration_ridge,
            anneal_fraction=args.anneal_fraction,
        )
        model_info["conversion"] = converted.to_dict()
        if converted.calibration is not None:
            accelerator.print(converted.calibration)
        annealer = converted.annealer
    distiller = None
    if teacher is not None:
        teacher.to(accelerator.device)
        distiller = conversion.FFNDistiller(model, teacher, args.distill_weight, teacher_context=accelerator.autocast)
        model_info["distill_weight"] = args.distill_weight
    return annealer, distiller


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.command = command_line(__file__, argv)  # results.json and the model card say how the run was made
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    accelerator = make_accelerator(args)
    # The output folder (writable, locked, no other run's files) is checked before any data or model is loaded.
    with claim_output_dir(accelerator, args, inputs=[args.model_name_or_path] if args.model_name_or_path else []):
        if args.resume_from_checkpoint:  # a broken checkpoint is refused before anything is loaded
            check_checkpoint(args.output_dir, args.resume_from_checkpoint)
        check_hub(args)  # --push_to_hub: the hub repository exists before any training
        return _run(args, accelerator)


def _run(args: argparse.Namespace, accelerator) -> dict[str, Any]:
    from accelerate.utils import set_seed

    set_seed(args.seed)
    config = model_config(args)
    whisper = config.model_type == "whisper"
    if args.encoder_seconds is not None and not whisper:
        raise UsageError(
            "--encoder_seconds applies to Whisper checkpoints; "
            f"{args.model_name_or_path or 'a scratch Wav2Vec2'} is not one"
        )
    if args.freeze_feature_encoder is None:  # default: the pretrained Wav2Vec2 conv stack stays as trained
        args.freeze_feature_encoder = args.init == "pretrained" and not whisper
    train_split, train_clips, eval_clips, data = load_clips(args)
    setup = (speech.whisper_setup if whisper else speech.wav2vec2_setup)(args, config, train_split)
    # Every target is encoded, every clip decoded and checked, before the model is loaded or trained.
    eval_data = setup.dataset(eval_clips)
    train_data = None if args.eval_only else setup.dataset(train_clips)
    model, model_info, state = build_model(args, config, setup)

    eval_batch_size = args.per_device_eval_batch_size or 2 * args.per_device_train_batch_size
    eval_loader = torch.utils.data.DataLoader(eval_data, batch_size=eval_batch_size, collate_fn=setup.collator)
    train_loader, annealer, distiller = None, None, None
    if train_data is not None:
        # Its own generator: a new epoch's iterator seeds from it, not from the global RNG a resume restores.
        train_loader = torch.utils.data.DataLoader(
            train_data,
            batch_size=args.per_device_train_batch_size,
            shuffle=True,
            collate_fn=setup.collator,
            generator=torch.Generator().manual_seed(args.seed),
        )
        annealer, distiller = convert(args, accelerator, model, setup, train_data, state, model_info)
    head = setup.head
    run = {
        **run_config(args),
        "data": {
            **data,
            "sampling_rate": setup.collator.feature_extractor.sampling_rate,
            **({"labels": head["labels"]} if args.task == "classify" else {}),
            **({"vocabulary_size": len(head["vocabulary"])} if "vocabulary" in head else {}),
            **({"encoder_seconds": model.config.max_source_positions / 50} if whisper else {}),
        },
    }
    results = new_results(accelerator, run, model_info)
    start_tracking(accelerator, args, "run_speech")
    evaluator = make_evaluator(accelerator, model, setup.compute_metrics, setup.eval_step, args.scope)
    if args.eval_only:
        model, eval_loader = accelerator.prepare(model, eval_loader)
        loaders = with_progress(args, accelerator, {data["eval_split"]: eval_loader})
        results = evaluate_only(accelerator, model, loaders, evaluator, args, results)
    else:
        # The loop (recipe_support.training.train): epochs of optimizer steps, an evaluation and a checkpoint each.
        model, loaders, state = train(
            args, accelerator, model, train_loader, {data["eval_split"]: eval_loader}, evaluator, results,
            annealer=annealer, compute_loss=distiller,
        )  # fmt: skip
        # The final metrics, the model (and its stock-ReLU export) with model cards, results.json.
        results = finish_training(accelerator, model, evaluator, loaders, state, results, args, setup.processor)
        publish(accelerator, args, args.model_name_or_path, results, results["final"])
    accelerator.end_training()
    return results


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line; any other exception is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
