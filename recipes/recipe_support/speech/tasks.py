"""What differs between the speech recipe's tasks and model families (Wav2Vec2 classification / CTC, Whisper
classification / seq2seq recognition), in one :class:`TaskSetup`: the processor, the head (labels or CTC vocabulary),
the targets, the collator, the eval step and the metrics (WER and CER: jiwer's corpus rates)."""

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
from torch.nn.utils.rnn import pad_sequence

from hf_helu.errors import UsageError
from recipe_support.evaluation import default_eval_step
from recipe_support.models import has_trained_head
from recipe_support.speech.audio import Clip, load_waveform
from recipe_support.speech.models import encoder_positions, min_input_samples

logger = logging.getLogger("speech")


@dataclass
class SpeechCollator:
    """Waveforms through the feature extractor: Wav2Vec2's normalises each clip and pads (with an attention mask
    only where the extractor returns one: not for wav2vec2-base's ``feat_extract_norm="group"``), Whisper's makes the
    log-mel window. Token-id labels are padded with -100; Whisper asr (``decoder_pad_id``) also gets the decoder
    inputs ids[:-1] for labels ids[1:], so that a frozen teacher and calibration, which drop the labels, run it."""

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
    """Batches of the first ``samples`` clips for conversion's calibration, none padded and none masked (a padding
    mask does not match the FFN activations' positions): clips of one input length (Whisper: every input is the
    log-mel window) and one target length per batch."""
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

    def targets(self, clips: list[Clip]) -> list[int] | list[list[int]]:
        """Class ids, or the token ids of the transcripts; a label or character the model lacks is an error."""
        if "labels" in self.head:
            label2id = {name: i for i, name in enumerate(self.head["labels"])}
            if unknown := next((clip for clip in clips if clip.label not in label2id), None):
                raise UsageError(
                    f"unknown label {unknown.label!r} of {unknown.source!r}: the model's labels are {list(label2id)}"
                )
            return [label2id[clip.label] for clip in clips]
        texts, vocabulary = [clean_transcript(clip) for clip in clips], self.head.get("vocabulary")
        for clip, text in zip(clips, texts, strict=True):  # CTC: characters (Whisper's byte-level BPE has them all)
            if vocabulary and (missing := sorted(set(text.replace(" ", "|")) - set(vocabulary))):
                raise UsageError(
                    f"transcript {text!r} of {clip.source!r} has characters {missing} missing from the vocabulary"
                )
        return self.processor.tokenizer(texts).input_ids

    def dataset(self, clips: list[Clip]) -> list[dict[str, Any]]:
        """Every target encoded and every clip decoded and checked, so that bad data fails before any training."""
        rate = self.collator.feature_extractor.sampling_rate
        cap, rows = round(self.max_seconds * rate), []
        for clip, target in zip(clips, self.targets(clips), strict=True):
            waveform = load_waveform(clip, rate)
            if "labels" in self.head:  # classification cuts long clips
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
    """Per-clip CTC loss (as ``ctc_loss_reduction="mean"``: over the target length), greedy transcripts of the clip's
    own frames, references."""
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
    references = labels.masked_fill(labels < 0, tokenizer.pad_token_id)
    hypotheses = tokenizer.batch_decode(generated, skip_special_tokens=True)
    return {
        "loss": loss,
        "hypotheses": hypotheses,
        "references": tokenizer.batch_decode(references, skip_special_tokens=True),
    }


def classify_setup(args: argparse.Namespace, config, train_split: list[Clip], extractor, **common) -> TaskSetup:
    """The checkpoint's trained labels, else the train split's classes (at least two, numbers in numeric order)."""
    if args.model_name_or_path is not None and has_trained_head(config, "classification"):
        labels = [config.id2label[i] for i in range(config.num_labels)]  # keep the checkpoint's label ids
    else:
        if unlabelled := next((clip for clip in train_split if not clip.label), None):
            raise UsageError(f"clip {unlabelled.source!r} has no label (classification needs one per clip)")
        labels = sorted(
            {clip.label for clip in train_split}, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n)
        )
    if len(labels) < 2:
        raise UsageError(
            f"dataset {args.dataset} has {len(labels)} class(es) {labels} in split {args.train_split!r}: "
            "classification needs at least 2"
        )
    collator = SpeechCollator(extractor)
    return TaskSetup({"labels": labels}, extractor, collator, default_eval_step, classify_metrics, **common)


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
    """Log-mel features of the (possibly shortened) encoder window; asr targets are the tokenized transcripts
    (``<|startoftranscript|>`` ... ``<|endoftext|>``), scored after Whisper's English normaliser."""
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
    processor = WhisperProcessor(extractor, tokenizer)
    return TaskSetup({}, processor, collator, step, metrics, max_seconds=min(args.max_seconds, seconds))
