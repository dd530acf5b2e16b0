"""Speech tasks (classify, asr) on Wav2Vec2-style and Whisper models: the model (scratch Wav2Vec2 configs that train on
a CPU, Whisper's shorter encoder window) and a :class:`TaskSetup`: processor, head, targets, collator, evaluation."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from hf_helu.errors import UsageError
from recipe_support.evaluation import default_eval_step
from recipe_support.models import Head, check_head, has_trained_head, load_model
from recipe_support.speech.audio import Clip, load_waveform

logger = logging.getLogger("speech")

# Four conv layers of total stride 320 (20 ms frames at 16 kHz, as wav2vec2-base; a first stride of 10 instead of 5
# halves the conv stack's cost, which dominates at these sizes), and SpecAugment masks short enough for short clips.
_SMALL = {
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "conv_bias": True,
    "conv_dim": (32, 32, 32, 32),
    "conv_kernel": (20, 8, 4, 4),
    "conv_stride": (10, 4, 4, 2),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "mask_time_length": 2,
    "layerdrop": 0.0,
    "ctc_loss_reduction": "mean",
    "ctc_zero_infinity": True,
}
_WIDTHS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "classifier_proj_size")
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {**_SMALL, **dict(zip(_WIDTHS, (32, 2, 2, 64, 32), strict=True))},
    "small": {**_SMALL, **dict(zip(_WIDTHS, (64, 3, 4, 256, 64), strict=True))},
    "base": {},  # Wav2Vec2Config() defaults: the wav2vec2-base architecture
}


def scratch_config(size: str = "small", overrides: str | None = None):
    """A ``Wav2Vec2Config`` of a named size, ``overrides`` (``"hidden_size=64,..."``) set by ``update_from_string``."""
    from transformers import Wav2Vec2Config

    if size not in SIZES:
        raise UsageError(f"unknown model size {size!r}: expected one of {sorted(SIZES)}")
    config = Wav2Vec2Config(**SIZES[size])
    if overrides:
        try:
            config.update_from_string(overrides)
        except (ValueError, TypeError) as err:
            raise UsageError(f"--config_overrides {overrides!r}: {err}; expected key=value[,key=value...]") from None
    return config


def min_input_samples(config) -> int:
    """The fewest waveform samples for which the conv feature encoder of ``config`` gives one frame."""
    needed = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=True))):
        needed = (needed - 1) * stride + kernel
    return needed


def build_model(
    task: str, *, model_name_or_path: str | None = None, init: str = "pretrained", config=None, **head: Any
) -> nn.Module:
    """A float32 model for ``task`` with a head for ``labels=`` (classify) or the CTC ``vocabulary=`` (``<pad>`` its
    blank), or Whisper's own decoder (asr): from a checkpoint (a trained head of another size is an error), its config
    with random weights (``init="scratch"``), or new from ``config``."""
    from transformers import AutoConfig, AutoModelForAudioClassification, AutoModelForCTC, AutoModelForSpeechSeq2Seq

    checkpoint = config or AutoConfig.from_pretrained(model_name_or_path)
    labels, vocabulary = head.get("labels"), head.get("vocabulary")
    if task == "classify":
        auto, fields = AutoModelForAudioClassification, {"id2label": dict(enumerate(labels))}
        fields["label2id"] = {name: i for i, name in enumerate(labels)}
        needs = Head("classification", len(labels), "the dataset", labels=tuple(labels), detail=", ".join(labels))
    elif checkpoint.model_type == "whisper":
        auto, fields, needs = AutoModelForSpeechSeq2Seq, {}, None
    else:
        auto, fields = AutoModelForCTC, {"vocab_size": len(vocabulary), "pad_token_id": vocabulary["<pad>"]}
        needs = Head("ctc", len(vocabulary), "the vocabulary", detail="characters and special tokens")
    if config is not None:
        return load_model(auto, config, **fields)
    if needs is not None:
        check_head(checkpoint, needs, model_name_or_path)
    return load_model(auto, model_name_or_path, init, **fields)


def encoder_positions(seconds: float, available: int) -> int:
    """Encoder positions (50 per second) of a Whisper window of whole ``seconds`` (the extractor's ``chunk_length``)."""
    if not (float(seconds).is_integer() and 1 <= seconds * 50 <= available):
        raise UsageError(f"--encoder_seconds {seconds}: expected whole seconds from 1 to {available / 50:g}")
    return int(seconds * 50)


def shorten_encoder(model: nn.Module, seconds: float) -> int:
    """Keep the first ``seconds`` x 50 encoder positions of a Whisper ``model`` in place (whisper.cpp's "audio
    context"); the saved model, with a feature extractor of that ``chunk_length``, runs in stock transformers."""
    encoder = model.get_encoder()
    old = encoder.embed_positions.weight
    positions = encoder_positions(seconds, len(old))
    kept = old[:positions].detach().clone()
    encoder.embed_positions = nn.Embedding.from_pretrained(kept, freeze=not old.requires_grad)
    encoder.max_source_positions = model.config.max_source_positions = positions
    return positions


@dataclass
class SpeechCollator:
    """Waveforms through the feature extractor (Wav2Vec2's normalises each clip and pads, with an attention mask only
    where the checkpoint uses one; Whisper's makes the log-mel window); token ids padded with -100. Whisper asr also
    gets the decoder inputs ids[:-1] for labels ids[1:]: a teacher and calibration, which drop the labels, run it."""

    feature_extractor: Any
    decoder_pad_id: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extractor, waveforms = self.feature_extractor, [row["input_values"] for row in rows]
        # Wav2Vec2: the mask is asked for so that normalisation skips the padding; Whisper pads to its window.
        padding = {} if "input_features" in extractor.model_input_names else {"padding": True}
        kwargs = {"sampling_rate": extractor.sampling_rate, "return_attention_mask": True, "return_tensors": "pt"}
        batch = dict(extractor(waveforms, **kwargs, **padding))
        if not extractor.return_attention_mask:
            del batch["attention_mask"]
        if not isinstance(rows[0]["labels"], list):
            return {**batch, "labels": torch.tensor([row["labels"] for row in rows])}
        ids = [torch.tensor(row["labels"]) for row in rows]
        if self.decoder_pad_id is not None:
            decoder_ids = [i[:-1] for i in ids]
            batch["decoder_input_ids"] = pad_sequence(decoder_ids, batch_first=True, padding_value=self.decoder_pad_id)
            ids = [i[1:] for i in ids]
        return {**batch, "labels": pad_sequence(ids, batch_first=True, padding_value=-100)}


def calibration_batches(dataset: list[dict], collator: SpeechCollator, samples: int, batch_size: int) -> list[dict]:
    """Unpadded, unmasked batches (a padding mask does not match the FFN activations' positions) of the first
    ``samples`` clips, for calibration: one input length (Whisper: its window) and one target length per batch."""
    whisper = "input_features" in collator.feature_extractor.model_input_names
    groups: dict[tuple[int, int], list[dict]] = {}
    for row in dataset[:samples]:
        groups.setdefault((0 if whisper else len(row["input_values"]), np.size(row["labels"])), []).append(row)
    batches = [collator(rows[i : i + batch_size]) for rows in groups.values() for i in range(0, len(rows), batch_size)]
    return [{key: value for key, value in batch.items() if key != "attention_mask"} for batch in batches]


@dataclass
class TaskSetup:
    """What differs between the tasks and model families: head, processor, collator, evaluation, clip checks."""

    head: dict[str, Any]  # build_model's labels= (classify) or vocabulary= (CTC); nothing for Whisper asr
    processor: Any  # saved with the model; asr: its tokenizer encodes the transcripts
    collator: SpeechCollator
    eval_step: Callable
    compute_metrics: Callable
    max_seconds: float  # where clips are cut (classify), or the longest clip (asr): --max_seconds or Whisper's window
    min_samples: int = 1  # the fewest samples that give the model one frame

    def dataset(self, clips: list[Clip]) -> list[dict[str, Any]]:
        """Each clip's target (class id, or transcript token ids) and checked audio; a label or character the model
        lacks, a clip too long for asr or too short for one frame is an error naming the clip, before any training."""
        rate, cut = self.collator.feature_extractor.sampling_rate, "labels" in self.head  # classification cuts clips
        if cut:
            label2id = {name: i for i, name in enumerate(self.head["labels"])}
            if unknown := next((clip for clip in clips if clip.label not in label2id), None):
                raise UsageError(
                    f"unknown label {unknown.label!r} of {unknown.source!r}: the model's labels are {list(label2id)}"
                )
            targets = [label2id[clip.label] for clip in clips]
        else:
            texts, vocabulary = [clean_transcript(clip) for clip in clips], self.head.get("vocabulary")
            for clip, text in zip(clips, texts, strict=True):  # CTC: characters (Whisper's byte-level BPE has all)
                if vocabulary and (missing := sorted(set(text.replace(" ", "|")) - set(vocabulary))):
                    raise UsageError(
                        f"transcript {text!r} of {clip.source!r} has characters {missing} missing from the vocabulary"
                    )
            targets = self.processor.tokenizer(texts).input_ids
        cap, rows = round(self.max_seconds * rate), []
        for clip, target in zip(clips, targets, strict=True):
            waveform = load_waveform(clip, rate)
            if cut:
                waveform = waveform[:cap]
            elif len(waveform) > cap:
                raise UsageError(
                    f"clip {clip.source!r} lasts {len(waveform) / rate:.2f} s, over the {self.max_seconds:g} s limit "
                    "(--max_seconds or Whisper's window): speech recognition does not cut clips (nor their transcript)"
                )
            if len(waveform) < self.min_samples:
                raise UsageError(
                    f"clip {clip.source!r} has {len(waveform)} samples at {rate} Hz ({len(waveform) / rate * 1000:.1f} "
                    f"ms): the model's feature encoder needs at least {self.min_samples} samples for one frame"
                )
            rows.append({"input_values": waveform, "labels": target})
        return rows


def clean_transcript(clip: Clip) -> str:
    """The clip's transcript with runs of whitespace collapsed to one space and the ends stripped."""
    if not (clip.transcript or "").strip():
        raise UsageError(f"clip {clip.source!r} has no transcript (speech recognition needs one per clip)")
    return " ".join(clip.transcript.split())


def build_vocabulary(transcripts: list[str]) -> dict[str, int]:
    """CTC characters: ``<pad>`` (the CTC blank) = 0, ``<unk>`` = 1, then ``|`` (the word delimiter) and the rest."""
    if not transcripts or any("|" in text for text in transcripts):
        raise UsageError("no training transcripts, or one with the word delimiter '|', to build a CTC vocabulary from")
    symbols = sorted(set("".join(transcripts).replace(" ", "|")) | {"|"})
    return {"<pad>": 0, "<unk>": 1, **{symbol: i for i, symbol in enumerate(symbols, 2)}}


def ctc_tokenizer(vocabulary: dict[str, int]):
    """A ``Wav2Vec2CTCTokenizer`` over ``vocabulary`` (no bos/eos, so its length is the vocabulary's)."""
    from transformers import Wav2Vec2CTCTokenizer

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocabulary), encoding="utf-8")
        return Wav2Vec2CTCTokenizer(str(Path(folder) / "vocab.json"), bos_token=None, eos_token=None)


def classify_metrics(outputs: dict[str, Any]) -> dict[str, float]:
    """Accuracy and mean cross-entropy of gathered logits and labels."""
    logits = torch.as_tensor(outputs["predictions"], dtype=torch.float64)
    labels = torch.as_tensor(outputs["labels"]).long()
    accuracy = (logits.argmax(dim=1) == labels).double().mean()
    return {"accuracy": float(accuracy), "loss": float(F.cross_entropy(logits, labels))}


def asr_metrics(outputs: dict[str, Any], normalize: Callable[[str], str] | None = None) -> dict[str, float]:
    """Corpus WER and CER, exact-match rate (FSDD: word accuracy) and mean per-clip loss, of the transcripts as
    ``normalize`` writes them (Whisper: transformers' ``EnglishTextNormalizer``, so that "Seven." and "7" match)."""
    references, hypotheses = outputs["references"], outputs["hypotheses"]
    if normalize is not None:
        references, hypotheses = [normalize(t) for t in references], [normalize(t) for t in hypotheses]
    return {
        "wer": jiwer.wer(references, hypotheses),
        "cer": jiwer.cer(references, hypotheses),
        "exact_match": float(np.mean([r == h for r, h in zip(references, hypotheses, strict=True)])),
        "loss": float(np.mean(outputs["loss"])),
    }


def ctc_eval_step(tokenizer, model, batch) -> dict[str, Any]:
    """Per-clip CTC loss (``ctc_loss_reduction="mean"``'s), greedy transcripts of each clip's own frames, references."""
    core, labels = getattr(model, "module", model), batch["labels"]
    logits = model(**batch).logits.float()
    samples = batch.get("attention_mask", torch.ones_like(batch["input_values"], dtype=torch.long)).sum(-1)
    frames = core._get_feat_extract_output_lengths(samples).long()
    lengths = (labels >= 0).sum(-1)
    log_probs, blank = logits.log_softmax(-1).transpose(0, 1), core.config.pad_token_id
    loss = F.ctc_loss(log_probs, labels[labels >= 0], frames, lengths, blank, "none", zero_infinity=True) / lengths
    hypotheses = tokenizer.batch_decode([ids[:n] for ids, n in zip(logits.argmax(-1), frames, strict=True)])
    references = tokenizer.batch_decode(labels.masked_fill(labels < 0, tokenizer.pad_token_id), group_tokens=False)
    return {"loss": loss, "hypotheses": hypotheses, "references": references}


def whisper_eval_step(tokenizer, max_new_tokens: int, model, batch) -> dict[str, Any]:
    """Per-clip teacher-forced loss, greedy ``generate`` transcripts, references."""
    features, labels = batch["input_features"], batch["labels"]
    logits = model(input_features=features, decoder_input_ids=batch["decoder_input_ids"]).logits.float()
    loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").sum(-1) / (labels != -100).sum(-1)
    generated = getattr(model, "module", model).generate(features, max_new_tokens=max_new_tokens)
    hypotheses = tokenizer.batch_decode(generated, skip_special_tokens=True)
    references = tokenizer.batch_decode(
        labels.masked_fill(labels < 0, tokenizer.pad_token_id), skip_special_tokens=True
    )
    return {"loss": loss, "hypotheses": hypotheses, "references": references}


def classify_setup(args: argparse.Namespace, config, train_split: list[Clip], extractor, **common) -> TaskSetup:
    """The checkpoint's trained labels, else the train split's classes (at least two, numbers in numeric order)."""
    if args.model_name_or_path is not None and has_trained_head(config, "classification"):
        labels = [config.id2label[i] for i in range(config.num_labels)]  # keep the checkpoint's label ids
    else:
        if unlabelled := next((clip for clip in train_split if not clip.label), None):
            raise UsageError(f"clip {unlabelled.source!r} has no label (classification needs one per clip)")
        names = {clip.label for clip in train_split}
        labels = sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
    if len(labels) < 2:
        raise UsageError(
            f"dataset {args.dataset} has {len(labels)} class(es) {labels} in split {args.train_split!r}: "
            "classification needs at least 2"
        )
    return TaskSetup(
        {"labels": labels}, extractor, SpeechCollator(extractor), default_eval_step, classify_metrics, **common
    )


def wav2vec2_setup(args: argparse.Namespace, config, train_split: list[Clip]) -> TaskSetup:
    """The checkpoint's feature extractor and CTC tokenizer, or new ones (a vocabulary of the training transcripts)."""
    from transformers import AutoFeatureExtractor, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    source, tokenizer = args.model_name_or_path, None
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=config.feat_extract_norm == "layer")  # a scratch one
    if source is not None:
        try:
            extractor = AutoFeatureExtractor.from_pretrained(source)
        except OSError:
            logger.warning("%s has no feature extractor config; using the default for its architecture", source)
        with contextlib.suppress(OSError, ValueError, TypeError):  # no vocabulary in the checkpoint: one is built
            tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(source) if args.task == "asr" else None
    common = {"max_seconds": args.max_seconds, "min_samples": min_input_samples(config)}
    if args.task == "classify":
        return classify_setup(args, config, train_split, extractor, **common)
    tokenizer = tokenizer or ctc_tokenizer(build_vocabulary([clean_transcript(clip) for clip in train_split]))
    processor, step = Wav2Vec2Processor(extractor, tokenizer), functools.partial(ctc_eval_step, tokenizer)
    head = {"vocabulary": tokenizer.get_vocab()}
    return TaskSetup(head, processor, SpeechCollator(extractor), step, asr_metrics, **common)


def whisper_setup(args: argparse.Namespace, config, train_split: list[Clip]) -> TaskSetup:
    """Log-mel features of the (possibly shortened) encoder window; transcripts scored after Whisper's normaliser."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    seconds = args.encoder_seconds or config.max_source_positions / 50
    chunk = encoder_positions(seconds, config.max_source_positions) // 50
    extractor = WhisperFeatureExtractor.from_pretrained(args.model_name_or_path, chunk_length=chunk)
    if args.task == "classify":
        return classify_setup(args, config, train_split, extractor, max_seconds=min(args.max_seconds, seconds))
    tokenizer = WhisperTokenizer.from_pretrained(args.model_name_or_path)
    collator = SpeechCollator(extractor, decoder_pad_id=tokenizer.pad_token_id)
    step = functools.partial(whisper_eval_step, tokenizer, args.generation_max_tokens)
    metrics = functools.partial(asr_metrics, normalize=EnglishTextNormalizer({}))
    return TaskSetup(
        {}, WhisperProcessor(extractor, tokenizer), collator, step, metrics, max_seconds=min(args.max_seconds, seconds)
    )
