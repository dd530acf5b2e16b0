"""Train and evaluate Wav2Vec2 or Whisper with HeLU on speech: keyword/digit classification or speech recognition.

An Accelerate script (no Trainer), on the training loop of :mod:`recipe_support.loop`::

    # From scratch on the Free Spoken Digit Dataset (offline), HeLU in the FFN blocks:
    python recipes/run_speech.py --task classify --dataset ../shared/data/fsdd --init scratch --model_size small \\
        --activation helu --epochs 5 --output_dir runs/fsdd_helu

    # Character CTC recognition of the spoken digit words:
    python recipes/run_speech.py --task asr --dataset ../shared/data/fsdd --init scratch --activation helu

    # Pretrained wav2vec2-base on a hub dataset (online):
    accelerate launch recipes/run_speech.py --task classify --model facebook/wav2vec2-base \\
        --dataset superb --dataset_config ks --activation helu

    # Whisper tiny.en (the model class comes from the checkpoint's config), a 3 s encoder window, HeLU in its
    # encoder and decoder FFNs, converted (--conversion auto: calibrate+anneal); evaluation by generate:
    python recipes/run_speech.py --task asr --model ../shared/data/whisper-tiny.en --encoder_seconds 3 \\
        --activation helu --epochs 1 --batch_size 8 --lr 1e-5 --output_dir runs/fsdd_whisper_helu

    # Evaluate a saved model:
    python recipes/run_speech.py --task classify --eval_only --model runs/fsdd_helu/model --dataset ../shared/data/fsdd

``--dataset`` is a local folder (FSDD, or the ``datasets`` audiofolder convention) or a hub id; a folder without an
eval split gets a stratified held-out split (``--eval_fraction``, ``--split_seed``, recorded in results.json).
OUTPUT_DIR/results.json holds the run config, per-epoch and final metrics (classify: accuracy and loss; asr: WER,
CER and loss, and for Whisper the exact-match rate), dead-unit statistics, wall time and the number of processes.
User errors (bad data, bad flags) print ``error: ...`` and exit 2 before any training.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from recipe_support import speech
from recipe_support.args import (
    add_conversion_args,
    add_training_args,
    check_conversion_args,
    fit_config,
    lora_settings,
    run_config,
)
from recipe_support.evaluation import default_eval_step
from recipe_support.loop import FitHooks, fit, make_accelerator
from recipe_support.models import has_trained_head, prepare_model, trainable_parameters
from recipe_support.output_dir import claim_output_dir
from recipe_support.paths import DATA_DIR_ENV, data_path

import hf_helu  # noqa: F401  (registers "helu" in transformers' ACT2FN, for checkpoints that use it)
from hf_helu import conversion
from hf_helu.errors import UsageError
from hf_helu.inputs import positive_int

logger = logging.getLogger("speech")

DEFAULT_PRETRAINED = "facebook/wav2vec2-base"
DEFAULT_LR = {"scratch": 1e-3, "pretrained": 5e-5}
LORA_TARGET_MODULES = ("q_proj", "v_proj")  # Wav2Vec2/HuBERT/WavLM attention projections
HEAD_MODULES = {"classify": ("projector", "classifier"), "asr": ("lm_head",), "whisper_asr": ()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=speech.TASKS, default="classify")
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
    parser.add_argument("--eval_fraction", type=float, default=0.2, help="No eval split: hold out this fraction.")
    parser.add_argument("--split_seed", type=int, default=0, help="Seed of that stratified held-out split.")
    parser.add_argument("--eval_stride", type=positive_int, default=None, help="Keep every Nth eval clip, in order.")
    parser.add_argument(
        "--encoder_seconds",
        type=float,
        default=None,
        help="Whisper: keep only this window of the encoder (50 positions per second; default: the checkpoint's).",
    )
    parser.add_argument("--generation_max_tokens", type=positive_int, default=64, help="Whisper asr: generate cap.")
    add_training_args(parser, lr=None, batch_size=16)
    add_conversion_args(parser)
    args = parser.parse_args(argv)
    check_conversion_args(args)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.init]
    if args.model is None and args.init == "pretrained":
        args.model = DEFAULT_PRETRAINED
    if args.lora and not args.lora_target_modules:
        args.lora_target_modules = list(LORA_TARGET_MODULES)
    fsdd = data_path("fsdd")
    if args.dataset is None and (fsdd is None or not fsdd.is_dir()):
        parser.error(f"--dataset is required (no FSDD folder in ${DATA_DIR_ENV})")
    args.dataset = args.dataset or str(fsdd)
    if args.config_overrides and args.model is not None:
        parser.error("--config_overrides applies to a scratch model built from --model_size; drop --model")
    return args


# --- model and processor -------------------------------------------------------------------------


def load_processor(args: argparse.Namespace, config: Any) -> tuple[Any, Any]:
    """(feature extractor, CTC tokenizer or None) of ``--model``, or new ones for a scratch config."""
    from transformers import AutoFeatureExtractor, Wav2Vec2CTCTokenizer

    if args.model is None:
        return speech.scratch_feature_extractor(config), None
    try:
        feature_extractor = AutoFeatureExtractor.from_pretrained(args.model)
    except OSError:
        logger.warning("%s has no feature extractor config; using the default for its architecture", args.model)
        feature_extractor = speech.scratch_feature_extractor(config)
    tokenizer = None
    if args.task == "asr":
        try:
            tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(args.model)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # no vocabulary in the checkpoint: one is built from the training transcripts
    return feature_extractor, tokenizer


def model_config(args: argparse.Namespace):
    from transformers import AutoConfig

    if args.model is None:
        return speech.scratch_config(args.model_size, args.config_overrides)
    return AutoConfig.from_pretrained(args.model)


def train_new_head(model: torch.nn.Module, task: str) -> None:
    """Under LoRA, the task head (new, randomly initialised) must still be trained in full."""
    heads = HEAD_MODULES[task]
    for name, param in model.named_parameters():
        if any(f".{head}." in f".{name}" for head in heads):
            param.requires_grad_(True)


# --- data ----------------------------------------------------------------------------------------


def load_clips(args: argparse.Namespace) -> speech.ClipSets:
    """The clips of the run; a local dataset with a train split only gets a stratified held-out eval split.

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
    eval_clips = splits[eval_split][:: args.eval_stride or 1]
    return speech.ClipSets(
        train_split, train, speech.subset_in_order(eval_clips, args.max_eval_samples), eval_split, held_out
    )


def waveforms(clips: list[speech.Clip], setup: speech.TaskSetup, args: argparse.Namespace) -> list[np.ndarray]:
    """Decoded, checked model inputs (:func:`recipe_support.speech.load_waveforms`)."""
    return speech.load_waveforms(
        clips,
        setup.sampling_rate,
        setup.max_seconds,
        cut=args.task == "classify",
        do_normalize=setup.normalize,
        min_samples=setup.min_samples,
        cap_name=setup.cap_name,
    )


# --- the task's head, targets and metrics ---------------------------------------------------------


def classify_labels(args: argparse.Namespace, config, train_split: list[speech.Clip]) -> list[str]:
    """The checkpoint's trained labels, else the train split's classes (at least two)."""
    if args.model is not None and has_trained_head(config, "classification"):
        return [config.id2label[i] for i in range(config.num_labels)]  # keep the checkpoint's label ids
    labels = speech.label_names(train_split)
    if len(labels) < 2:
        raise UsageError(
            f"dataset {args.dataset} has {len(labels)} class(es) {labels} in split {args.train_split!r}: "
            "classification needs at least 2"
        )
    return labels


def classify_setup(args, config, train_split, feature_extractor, common: dict[str, Any]) -> speech.TaskSetup:
    labels = classify_labels(args, config, train_split)
    encode = functools.partial(speech.label_ids, label2id={name: i for i, name in enumerate(labels)})
    step, metrics = default_eval_step, speech.classify_metrics
    return speech.TaskSetup(
        {"labels": labels}, encode, feature_extractor, eval_step=step, compute_metrics=metrics, **common
    )


def wav2vec2_setup(args: argparse.Namespace, config, train_split: list[speech.Clip]) -> speech.TaskSetup:
    feature_extractor, tokenizer = load_processor(args, config)
    common = {
        "collator": speech.SpeechCollator(
            return_attention_mask=bool(feature_extractor.return_attention_mask),
            padding_value=float(feature_extractor.padding_value),
        ),
        "sampling_rate": feature_extractor.sampling_rate,
        "max_seconds": args.max_seconds,
        "normalize": getattr(feature_extractor, "do_normalize", True),
        "min_samples": speech.min_input_samples(config),
    }
    if args.task == "classify":
        return classify_setup(args, config, train_split, feature_extractor, common)
    from transformers import Wav2Vec2Processor

    if tokenizer is None:
        train_texts = [speech.clean_transcript(c.transcript, c.source) for c in train_split]
        if not train_texts:
            raise UsageError(
                f"no CTC vocabulary: {args.model} has no vocab.json and there is no {args.train_split!r} split "
                "to build one from"
            )
        tokenizer = speech.ctc_tokenizer(speech.build_vocabulary(train_texts))
    vocabulary = tokenizer.get_vocab()

    def encode(clips):
        return [tokenizer(text).input_ids for text in speech.check_transcripts(clips, vocabulary)]

    processor = Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    step, metrics = speech.make_ctc_eval_step(tokenizer), speech.ctc_metrics
    return speech.TaskSetup(
        {"vocabulary": vocabulary}, encode, processor, eval_step=step, compute_metrics=metrics, **common
    )


def whisper_setup(args: argparse.Namespace, config, train_split: list[speech.Clip]) -> speech.TaskSetup:
    """Whisper: log-mel features of the (possibly shortened) window; asr targets are the tokenized transcripts."""
    from transformers import WhisperProcessor, WhisperTokenizer

    seconds = args.encoder_seconds or speech.window_seconds(config)
    speech.encoder_positions(seconds, config.max_source_positions)  # a bad window is refused before any decoding
    feature_extractor = speech.load_feature_extractor(args.model, seconds)
    common = {
        "sampling_rate": feature_extractor.sampling_rate,
        "max_seconds": min(args.max_seconds, seconds),
        "cap_name": "the encoder window of" if seconds < args.max_seconds else "--max_seconds",
        "normalize": False,
        "whisper": True,
    }
    if args.task == "classify":
        common["collator"] = speech.WhisperCollator(feature_extractor)
        return classify_setup(args, config, train_split, feature_extractor, common)
    tokenizer = WhisperTokenizer.from_pretrained(args.model)

    def encode(clips):
        texts = [speech.clean_transcript(clip.transcript, clip.source) for clip in clips]
        return speech.transcript_ids(tokenizer, texts)

    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    collator = speech.WhisperCollator(feature_extractor, pad_token_id=tokenizer.pad_token_id)
    step = speech.make_whisper_eval_step(tokenizer, args.generation_max_tokens)
    return speech.TaskSetup({}, encode, processor, collator, step, speech.whisper_asr_metrics, **common)


def load_task_model(args: argparse.Namespace, config, setup: speech.TaskSetup) -> torch.nn.Module:
    """The task's float32 model, its encoder window cut (Whisper) or its feature encoder frozen if asked."""
    if setup.whisper:
        labels = setup.head.get("labels")
        model = speech.build_whisper_model(args.task, args.model, args.init, labels)
        if args.encoder_seconds is not None:
            speech.shorten_encoder(model, args.encoder_seconds)
        if args.freeze_feature_encoder:  # off unless asked
            speech.freeze_conv_frontend(model)
        return model
    model = speech.build_model(
        args.task,
        model_name_or_path=args.model,
        init=args.init,
        config=config if args.model is None else None,
        **setup.head,
    )
    if args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model


def build_model(
    args: argparse.Namespace, config, setup: speech.TaskSetup
) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """The task's model with HeLU / LoRA (the new head trained in full), its model_info, and the conversion state:
    (original activations, the frozen teacher, the resolved conversion choice)."""
    model = load_task_model(args, config, setup)
    choice = conversion.resolve_conversion(
        args.conversion, activation=args.activation, model=model, init=args.init, training=not args.eval_only
    )
    originals = conversion.original_activations(model) if choice.method != "none" else None  # before patching
    teacher = copy.deepcopy(model) if args.distill_weight else None
    model, model_info = prepare_model(model, args.activation, args.alpha, args.scope, lora=lora_settings(args))
    model_info["conversion_choice"] = choice.to_dict()
    if args.lora:
        train_new_head(model, "whisper_asr" if setup.whisper and args.task == "asr" else args.task)
        model_info["lora"]["trainable_params"] = trainable_parameters(model)
    return model, model_info, (originals, teacher, choice)


# --- conversion ----------------------------------------------------------------------------------


def convert(args, accelerator, model, setup, train_data, state, model_info) -> tuple[Any, Any]:
    """Calibrate / set up annealing (the resolved method) and the distiller; returns (on_step, compute_loss)."""
    originals, teacher, choice = state
    on_step = None
    if choice.method != "none":
        converted = conversion.apply_conversion(
            model.to(accelerator.device),
            choice.method,
            originals,
            calibration_batches=speech.calibration_batches(
                train_data,
                setup.collator,
                args.calibration_samples,
                args.eval_batch_size or 2 * args.batch_size,
                by_target_length=setup.whisper and args.task == "asr",
            ),
            ridge=args.calibration_ridge,
            anneal_fraction=args.anneal_fraction,
        )
        model_info["conversion"] = converted.to_dict()
        if converted.calibration is not None:
            accelerator.print(converted.calibration)
        on_step = converted.annealer.on_step if converted.annealer else None
    distiller = None
    if teacher is not None:
        teacher.to(accelerator.device)
        distiller = conversion.FFNDistiller(model, teacher, args.distill_weight, teacher_context=accelerator.autocast)
        model_info["distill_weight"] = args.distill_weight
    return on_step, distiller


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    accelerator = make_accelerator(args.mixed_precision, args.gradient_accumulation_steps, args.seed)
    # The output folder (writable, locked, no other run's files) is checked before any data or model is loaded.
    with claim_output_dir(accelerator, fit_config(args), inputs=[args.model] if args.model else []):
        return _run(args, accelerator)


def _run(args: argparse.Namespace, accelerator) -> dict[str, Any]:
    from accelerate.utils import set_seed

    set_seed(args.seed)
    config = model_config(args)
    whisper = speech.is_whisper(config)
    if args.encoder_seconds is not None and not whisper:
        raise UsageError(
            f"--encoder_seconds applies to Whisper checkpoints; {args.model or 'a scratch Wav2Vec2'} is not one"
        )
    if args.freeze_feature_encoder is None:  # default: the pretrained Wav2Vec2 conv stack stays as trained
        args.freeze_feature_encoder = args.init == "pretrained" and not whisper
    clips = load_clips(args)
    setup = (whisper_setup if whisper else wav2vec2_setup)(args, config, clips.train_split)
    # Every clip is decoded and checked, every target encoded, before the model is loaded or trained.
    eval_data = speech.SpeechDataset(waveforms(clips.eval, setup, args), setup.encode(clips.eval))
    train_data = None
    if not args.eval_only:
        train_data = speech.SpeechDataset(waveforms(clips.train, setup, args), setup.encode(clips.train))
    model, model_info, state = build_model(args, config, setup)

    eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    eval_loader = torch.utils.data.DataLoader(eval_data, batch_size=eval_batch_size, collate_fn=setup.collator)
    train_loader, on_step, distiller = None, None, None
    if train_data is not None:
        train_loader = torch.utils.data.DataLoader(
            train_data, batch_size=args.batch_size, shuffle=True, collate_fn=setup.collator
        )
        on_step, distiller = convert(args, accelerator, model, setup, train_data, state, model_info)
    head = setup.head
    run = {
        **run_config(args),
        "data": {
            "train_clips": len(clips.train),
            "eval_clips": len(clips.eval),
            "eval_split": clips.eval_split,
            "held_out_split": clips.held_out,
            "sampling_rate": setup.sampling_rate,
            **({"labels": head["labels"]} if args.task == "classify" else {}),
            **({"vocabulary_size": len(head["vocabulary"])} if "vocabulary" in head else {}),
            **({"encoder_seconds": speech.window_seconds(model.config)} if whisper else {}),
        },
    }
    results = fit(
        accelerator,
        model,
        train_loader,
        {clips.eval_split: eval_loader},
        setup.compute_metrics,
        fit_config(args),
        hooks=FitHooks(eval_step=setup.eval_step, on_step=on_step, compute_loss=distiller),
        processor=setup.processor,
        run_config=run,
        model_info=model_info,
    )
    accelerator.end_training()
    return results


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line; any other exception is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
