"""Speech metrics: corpus WER and CER (jiwer) and accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import jiwer


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


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    if len(labels) != len(predictions) or not labels:
        raise ValueError(f"accuracy needs equal, non-empty sequences; got {len(labels)} and {len(predictions)}")
    return sum(int(a == b) for a, b in zip(labels, predictions, strict=True)) / len(labels)
