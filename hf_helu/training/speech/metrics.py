"""Speech metrics: corpus WER and CER (jiwer's definitions, without jiwer) and accuracy."""

from __future__ import annotations

from collections.abc import Sequence


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance (substitutions + deletions + insertions), one row at a time."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, start=1):
        current = [i]
        for j, hyp_item in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_item != hyp_item)))
        previous = current
    return previous[-1]


def _error_rate(references: Sequence[str], hypotheses: Sequence[str], split) -> float:
    if isinstance(references, str) or isinstance(hypotheses, str):
        references, hypotheses = [references], [hypotheses]
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(split(r), split(h)) for r, h in zip(references, hypotheses, strict=True)]
    total = sum(len(r) for r, _ in pairs)
    if total == 0:
        raise ValueError("error rate is undefined: the references are empty")
    return sum(edit_distance(r, h) for r, h in pairs) / total


def word_error_rate(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Corpus WER: word edits summed over the corpus / reference words (jiwer's definition)."""
    return _error_rate(references, hypotheses, str.split)


def char_error_rate(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Corpus CER: character edits (spaces included) / reference characters, ends stripped (as jiwer)."""
    return _error_rate(references, hypotheses, lambda text: list(text.strip()))


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    if len(labels) != len(predictions) or not labels:
        raise ValueError(f"accuracy needs equal, non-empty sequences; got {len(labels)} and {len(predictions)}")
    return sum(int(a == b) for a, b in zip(labels, predictions, strict=True)) / len(labels)
