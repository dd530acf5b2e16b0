"""Eval steps and metrics of the speech recipe's Wav2Vec2 tasks: classification (accuracy, loss) and CTC
recognition (greedy transcripts, WER, CER, per-clip loss). Whisper's are in :mod:`.whisper`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recipe_support.speech.metrics import accuracy, char_error_rate, word_error_rate


def classify_metrics(outputs: dict[str, Any]) -> dict[str, float]:
    """Accuracy and mean cross-entropy of gathered logits and labels."""
    logits = np.asarray(outputs["predictions"], dtype=np.float64)
    labels = np.asarray(outputs["labels"]).astype(np.int64)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    return {
        "accuracy": accuracy(labels.tolist(), logits.argmax(axis=1).tolist()),
        "loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
    }


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
