"""Train and evaluate Wav2Vec2 with HeLU on speech: keyword/digit classification or CTC speech recognition.

An Accelerate script (no Trainer), on the training loop of :mod:`hf_helu.training.loop`::

    # From scratch on the Free Spoken Digit Dataset (offline), HeLU in the FFN blocks:
    python recipes/run_speech.py --task classify --dataset ../shared/data/fsdd --init scratch --model_size small \\
        --activation helu --epochs 5 --output_dir runs/fsdd_helu

    # Character CTC recognition of the spoken digit words:
    python recipes/run_speech.py --task asr --dataset ../shared/data/fsdd --init scratch --activation helu

    # Pretrained wav2vec2-base on a hub dataset (online):
    accelerate launch recipes/run_speech.py --task classify --model facebook/wav2vec2-base \\
        --dataset superb --dataset_config ks --activation helu

    # Evaluate a saved model:
    python recipes/run_speech.py --task classify --eval_only --model runs/fsdd_helu/model --dataset ../shared/data/fsdd

``--dataset`` is a local folder (FSDD, or the ``datasets`` audiofolder convention) or a hub id.
OUTPUT_DIR/results.json holds the run config, per-epoch and final metrics (classify: accuracy and
loss; asr: WER, CER and loss), dead-unit statistics, wall time and the number of processes.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import hf_helu  # noqa: F401  (registers "helu" in transformers' ACT2FN, for checkpoints that use it)
from hf_helu.training import paths, speech
from hf_helu.training.args import add_training_args, fit_config, lora_settings, run_config
from hf_helu.training.evaluation import default_eval_step
from hf_helu.training.loop import FitHooks, fit, make_accelerator
from hf_helu.training.models import has_trained_head, prepare_model, trainable_parameters

logger = logging.getLogger("speech")

DEFAULT_PRETRAINED = "facebook/wav2vec2-base"
DEFAULT_LR = {"scratch": 1e-3, "pretrained": 5e-5}
LORA_TARGET_MODULES = ("q_proj", "v_proj")  # Wav2Vec2/HuBERT/WavLM attention projections
HEAD_MODULES = {"classify": ("projector", "classifier"), "asr": ("lm_head",)}


def default_dataset() -> str | None:
    """FSDD under ``$HF_HELU_DATA_DIR``, else beside the checkout (``../shared/data/fsdd``)."""
    fsdd = paths.fsdd_dir()
    return str(fsdd) if fsdd.is_dir() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=speech.TASKS, default="classify")
    parser.add_argument(
        "--dataset", default=default_dataset(), help="FSDD or audiofolder folder, or a hub id (default: FSDD)."
    )
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
        help="Freeze the conv feature encoder (default: yes for a pretrained model, no from scratch).",
    )
    add_training_args(parser, lr=None, batch_size=16)
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.init]
    if args.model is None and args.init == "pretrained":
        args.model = DEFAULT_PRETRAINED
    if args.freeze_feature_encoder is None:
        args.freeze_feature_encoder = args.init == "pretrained"
    if args.lora and not args.lora_target_modules:
        args.lora_target_modules = list(LORA_TARGET_MODULES)
    if args.dataset is None:
        parser.error("--dataset is required (no FSDD folder found beside the checkout or in $HF_HELU_DATA_DIR)")
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


def load_clips(args: argparse.Namespace) -> tuple[list[speech.Clip], list[speech.Clip], list[speech.Clip], str]:
    """(whole train split, the training clips used, the eval clips, the eval split's name).

    Labels and the CTC vocabulary come from the whole train split, so a --max_train_samples subset that
    happens to miss a class or a character still builds the same model head.
    """
    local = Path(args.dataset).is_dir()
    columns = {} if local else {"label_column": args.label_column, "text_column": args.text_column}
    splits = speech.load_splits(args.dataset, args.dataset_config, **columns)
    eval_split = speech.pick_eval_split(splits, args.eval_split)
    if not args.eval_only and args.train_split not in splits:
        raise ValueError(f"train split {args.train_split!r} not in the dataset's splits {sorted(splits)}")
    # A fixed subsampling seed: every --seed of a comparison sees the same clips. With --eval_only the training
    # clips are not decoded; they only give a scratch model its labels or vocabulary.
    train_split = splits.get(args.train_split, [])
    train = speech.subset_in_order(train_split, args.max_train_samples)
    return train_split, train, speech.subset_in_order(splits[eval_split], args.max_eval_samples), eval_split


def waveforms(clips: list[speech.Clip], feature_extractor, args: argparse.Namespace) -> list[np.ndarray]:
    """Decoded model inputs; for asr a clip over the length cap is an error, not a silently cut transcript."""
    rate = feature_extractor.sampling_rate
    cap = None if args.task == "asr" else args.max_seconds
    result = []
    for clip in clips:
        waveform = speech.load_waveform(clip, rate, cap, getattr(feature_extractor, "do_normalize", True))
        if args.task == "asr" and len(waveform) > speech.max_samples(args.max_seconds, rate):
            raise ValueError(
                f"clip {clip.source!r} lasts {len(waveform) / rate:.2f} s, over --max_seconds {args.max_seconds}: "
                "speech recognition does not cut clips (the transcript would no longer match); raise the cap"
            )
        result.append(waveform)
    return result


# --- evaluation ----------------------------------------------------------------------------------


def classify_metrics(outputs: dict[str, Any]) -> dict[str, float]:
    logits = np.asarray(outputs["predictions"], dtype=np.float64)
    labels = np.asarray(outputs["labels"]).astype(np.int64)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    return {
        "accuracy": speech.accuracy(labels.tolist(), logits.argmax(axis=1).tolist()),
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
    }


def make_asr_eval_step(tokenizer):
    """Eval step for CTC: per-clip loss (as the model's ``ctc_loss_reduction="mean"``), greedy transcripts."""

    def eval_step(model, batch) -> dict[str, Any]:
        outputs = model(**batch)
        logits = outputs.logits.float()
        unwrapped = getattr(model, "module", model)
        if "attention_mask" in batch:
            frames = unwrapped._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1)).long()
        else:
            frames = torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long, device=logits.device)
        labels = batch["labels"]
        target_lengths = (labels >= 0).sum(-1)
        log_probs = F.log_softmax(logits, dim=-1).transpose(0, 1)
        per_clip = F.ctc_loss(
            log_probs,
            labels.masked_select(labels >= 0),
            frames,
            target_lengths,
            blank=unwrapped.config.pad_token_id,
            reduction="none",
            zero_infinity=True,
        ) / target_lengths.clamp(min=1)
        predicted_ids = logits.argmax(-1)
        hypotheses = [tokenizer.decode(ids[:n].tolist()) for ids, n in zip(predicted_ids, frames.tolist(), strict=True)]
        references = [
            tokenizer.decode(ids[ids >= 0].tolist(), group_tokens=False, clean_up_tokenization_spaces=False)
            for ids in labels
        ]
        return {"loss": per_clip, "hypotheses": hypotheses, "references": references}

    return eval_step


def asr_metrics(outputs: dict[str, Any]) -> dict[str, float]:
    references, hypotheses = outputs["references"], outputs["hypotheses"]
    return {
        "wer": speech.word_error_rate(references, hypotheses),
        "cer": speech.char_error_rate(references, hypotheses),
        "loss": float(np.mean(outputs["loss"])),
    }


# --- the task's head, targets and metrics ---------------------------------------------------------


@dataclass
class TaskSetup:
    """What differs between classify and asr: the head, how clips become targets, the processor and the metrics."""

    head: dict[str, Any]  # build_model's labels= or vocabulary=
    encode: Any  # clips -> targets (class ids, or token ids)
    processor: Any  # saved with the model
    eval_step: Any
    compute_metrics: Any


def classify_setup(args: argparse.Namespace, config, train_split: list[speech.Clip], feature_extractor) -> TaskSetup:
    if args.model is not None and has_trained_head(config, "classification"):
        labels = [config.id2label[i] for i in range(config.num_labels)]  # keep the checkpoint's label ids
    else:
        labels = speech.label_names(train_split)
    label2id = {name: i for i, name in enumerate(labels)}
    encode = functools.partial(speech.label_ids, label2id=label2id)
    return TaskSetup({"labels": labels}, encode, feature_extractor, default_eval_step, classify_metrics)


def asr_setup(args: argparse.Namespace, train_split: list[speech.Clip], feature_extractor, tokenizer) -> TaskSetup:
    from transformers import Wav2Vec2Processor

    if tokenizer is None:
        train_texts = [speech.clean_transcript(c.transcript, c.source) for c in train_split]
        if not train_texts:
            raise ValueError(
                f"no CTC vocabulary: {args.model} has no vocab.json and there is no {args.train_split!r} split "
                "to build one from"
            )
        tokenizer = speech.ctc_tokenizer(speech.build_vocabulary(train_texts))
    vocabulary = tokenizer.get_vocab()

    def encode(clips):
        return [tokenizer(text).input_ids for text in speech.check_transcripts(clips, vocabulary)]

    processor = Wav2Vec2Processor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    return TaskSetup({"vocabulary": vocabulary}, encode, processor, make_asr_eval_step(tokenizer), asr_metrics)


def build_model(args: argparse.Namespace, config, setup: TaskSetup) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The task's model, feature encoder frozen if asked, then HeLU / LoRA (the new head trained in full)."""
    model = speech.build_model(
        args.task,
        model_name_or_path=args.model,
        init=args.init,
        config=config if args.model is None else None,
        **setup.head,
    )
    if args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    model, model_info = prepare_model(model, args.activation, args.alpha, args.scope, lora=lora_settings(args))
    if args.lora:
        train_new_head(model, args.task)
        model_info["lora"]["trainable_params"] = trainable_parameters(model)
    return model, model_info


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from accelerate.utils import set_seed

    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    accelerator = make_accelerator(args.mixed_precision, args.gradient_accumulation_steps, args.seed)
    set_seed(args.seed)

    train_split, train_clips, eval_clips, eval_split = load_clips(args)
    config = model_config(args)
    feature_extractor, tokenizer = load_processor(args, config)
    if args.task == "classify":
        setup = classify_setup(args, config, train_split, feature_extractor)
    else:
        setup = asr_setup(args, train_split, feature_extractor, tokenizer)
    eval_targets = setup.encode(eval_clips)
    train_targets = None if args.eval_only else setup.encode(train_clips)
    model, model_info = build_model(args, config, setup)

    collator = speech.SpeechCollator(
        return_attention_mask=bool(feature_extractor.return_attention_mask),
        padding_value=float(feature_extractor.padding_value),
    )
    eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    eval_data = speech.SpeechDataset(waveforms(eval_clips, feature_extractor, args), eval_targets)
    eval_loader = torch.utils.data.DataLoader(eval_data, batch_size=eval_batch_size, collate_fn=collator)
    train_loader = None
    if not args.eval_only:
        train_data = speech.SpeechDataset(waveforms(train_clips, feature_extractor, args), train_targets)
        train_loader = torch.utils.data.DataLoader(
            train_data, batch_size=args.batch_size, shuffle=True, collate_fn=collator
        )
    head = setup.head
    run = {
        **run_config(args),
        "data": {
            "train_clips": len(train_clips),
            "eval_clips": len(eval_clips),
            "eval_split": eval_split,
            "sampling_rate": feature_extractor.sampling_rate,
            **({"labels": head["labels"]} if args.task == "classify" else {"vocabulary_size": len(head["vocabulary"])}),
        },
    }
    results = fit(
        accelerator,
        model,
        train_loader,
        {eval_split: eval_loader},
        setup.compute_metrics,
        fit_config(args),
        hooks=FitHooks(eval_step=setup.eval_step),
        processor=setup.processor,
        run_config=run,
        model_info=model_info,
    )
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
