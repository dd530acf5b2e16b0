"""Eval steps and metrics of the speech recipe: classification (accuracy, loss), CTC recognition (greedy
transcripts) and Whisper recognition (``generate``, Whisper's ``EnglishTextNormalizer``); WER and CER are jiwer's
corpus rates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jiwer
import numpy as np
import torch
import torch.nn.functional as F


def _as_lists(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> tuple[list[str], list[str]]:
    if isinstance(references, str) or isinstance(hypotheses, str):
        references, hypotheses = [references], [hypotheses]
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not any(text.strip() for text in references):
        raise ValueError("error rate is undefined: the references are empty")
    return list(references), list(hypotheses)


def word_error_rate(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Corpus WER: word edits summed over the corpus / reference words."""
    return float(jiwer.wer(*_as_lists(references, hypotheses)))


def char_error_rate(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Corpus CER: character edits (spaces included) / reference characters, ends stripped."""
    return float(jiwer.cer(*_as_lists(references, hypotheses)))


def classify_metrics(outputs: dict[str, Any]) -> dict[str, float]:
    """Accuracy and mean cross-entropy of gathered logits and labels."""
    logits = torch.as_tensor(np.asarray(outputs["predictions"]), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(outputs["labels"]).astype(np.int64))
    accuracy = (logits.argmax(dim=1) == labels).double().mean()
    return {"accuracy": float(accuracy), "loss": float(F.cross_entropy(logits, labels))}


def make_ctc_eval_step(tokenizer):
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


def ctc_metrics(outputs: dict[str, Any]) -> dict[str, float]:
    """Corpus WER and CER of the greedy transcripts, and the mean per-clip loss."""
    references, hypotheses = outputs["references"], outputs["hypotheses"]
    return {
        "wer": word_error_rate(references, hypotheses),
        "cer": char_error_rate(references, hypotheses),
        "loss": float(np.mean(outputs["loss"])),
    }


def make_whisper_eval_step(tokenizer, max_new_tokens: int):
    """Eval step for Whisper asr: per-clip teacher-forced loss, greedy ``generate`` transcripts, references."""

    def eval_step(model, batch) -> dict[str, Any]:
        unwrapped = getattr(model, "module", model)
        labels = batch["labels"]
        logits = model(input_features=batch["input_features"], decoder_input_ids=batch["decoder_input_ids"]).logits
        token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        counts = (labels != -100).sum(-1).clamp(min=1)
        per_clip = token_loss.sum(-1) / counts
        generated = unwrapped.generate(batch["input_features"], max_new_tokens=max_new_tokens)
        hypotheses = tokenizer.batch_decode(generated, skip_special_tokens=True)
        references = tokenizer.batch_decode(
            torch.where(labels == -100, tokenizer.pad_token_id, labels), skip_special_tokens=True
        )
        return {"loss": per_clip, "hypotheses": hypotheses, "references": references}

    return eval_step


def normalize_text(text: str) -> str:
    """Whisper's English normaliser (transformers' ``EnglishTextNormalizer``): lower case, no punctuation, numbers
    as digits (``" Seven."`` -> ``"7"``), so that "seven" and "7" match."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer({})(text)


def whisper_asr_metrics(outputs: dict[str, Any]) -> dict[str, float]:
    """WER and CER of the normalised transcripts, exact-match rate (for FSDD: word accuracy), mean loss."""
    references = [normalize_text(text) for text in outputs["references"]]
    hypotheses = [normalize_text(text) for text in outputs["hypotheses"]]
    exact = sum(r == h for r, h in zip(references, hypotheses, strict=True)) / len(references)
    return {
        "wer": word_error_rate(references, hypotheses),
        "cer": char_error_rate(references, hypotheses),
        "exact_match": exact,
        "loss": float(np.mean(outputs["loss"])),
    }
