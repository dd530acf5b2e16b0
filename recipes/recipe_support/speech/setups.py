"""How run_speech.py sets up each task: the processor, the head (labels or CTC vocabulary), the target encoding,
the collator and the evaluation of Wav2Vec2-style and Whisper models (:class:`recipe_support.speech.TaskSetup`)."""

from __future__ import annotations

import argparse
import functools
import logging
from typing import Any

import torch

from hf_helu.errors import UsageError
from recipe_support import speech
from recipe_support.evaluation import default_eval_step
from recipe_support.models import has_trained_head

logger = logging.getLogger("speech")

HEAD_MODULES = {"classify": ("projector", "classifier"), "asr": ("lm_head",), "whisper_asr": ()}


def load_processor(args: argparse.Namespace, config: Any) -> tuple[Any, Any]:
    """(feature extractor, CTC tokenizer or None) of ``--model``, or new ones for a scratch config."""
    from transformers import AutoFeatureExtractor, Wav2Vec2CTCTokenizer

    if args.model_name_or_path is None:
        return speech.scratch_feature_extractor(config), None
    try:
        feature_extractor = AutoFeatureExtractor.from_pretrained(args.model_name_or_path)
    except OSError:
        logger.warning(
            "%s has no feature extractor config; using the default for its architecture", args.model_name_or_path
        )
        feature_extractor = speech.scratch_feature_extractor(config)
    tokenizer = None
    if args.task == "asr":
        try:
            tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # no vocabulary in the checkpoint: one is built from the training transcripts
    return feature_extractor, tokenizer


def train_new_head(model: torch.nn.Module, task: str) -> None:
    """Under LoRA, the task head (new, randomly initialised) must still be trained in full."""
    heads = HEAD_MODULES[task]
    for name, param in model.named_parameters():
        if any(f".{head}." in f".{name}" for head in heads):
            param.requires_grad_(True)


def classify_labels(args: argparse.Namespace, config, train_split: list[speech.Clip]) -> list[str]:
    """The checkpoint's trained labels, else the train split's classes (at least two)."""
    if args.model_name_or_path is not None and has_trained_head(config, "classification"):
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
        "collator": speech.SpeechCollator(feature_extractor),
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
                f"no CTC vocabulary: {args.model_name_or_path} has no vocab.json and there is no "
                f"{args.train_split!r} split to build one from"
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
    feature_extractor = speech.load_feature_extractor(args.model_name_or_path, seconds)
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
    tokenizer = WhisperTokenizer.from_pretrained(args.model_name_or_path)

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
        model = speech.build_whisper_model(args.task, args.model_name_or_path, args.init, labels)
        if args.encoder_seconds is not None:
            speech.shorten_encoder(model, args.encoder_seconds)
        if args.freeze_feature_encoder:  # off unless asked
            speech.freeze_conv_frontend(model)
        return model
    model = speech.build_model(
        args.task,
        model_name_or_path=args.model_name_or_path,
        init=args.init,
        config=config if args.model_name_or_path is None else None,
        **setup.head,
    )
    if args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model
