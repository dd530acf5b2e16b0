"""Speech recognition metrics (recipe_support.speech.asr_metrics: jiwer's WER and CER, exact match, loss) against an
edit distance written here."""

from __future__ import annotations

import math

import pytest
from recipe_support import speech

REFERENCES = ["the cat sat on the mat", "seven", "one two three", "hello world", "a b c d"]
HYPOTHESES = ["the cat sit on mat", "seven", "one too three four", "", "a  b x d e"]


def edit_distance(reference, hypothesis) -> int:
    """Levenshtein distance by the full dynamic-programming table (the independent reference)."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(hypothesis) + 1)] for i in range(len(reference) + 1)]
    for i in range(1, len(reference) + 1):
        for j in range(1, len(hypothesis) + 1):
            substitution = table[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1])
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, substitution)
    return table[-1][-1]


def corpus_rate(references, hypotheses, split) -> float:
    """Edits summed over the corpus / reference units (words, or characters with the ends stripped)."""
    pairs = [(split(r), split(h)) for r, h in zip(references, hypotheses, strict=True)]
    return sum(edit_distance(r, h) for r, h in pairs) / sum(len(r) for r, _ in pairs)


def characters(text: str) -> list[str]:
    return list(text.strip())


def metrics(references, hypotheses) -> dict[str, float]:
    return speech.asr_metrics({"references": references, "hypotheses": hypotheses, "loss": [1.0] * len(references)})


def test_wer_and_cer_are_corpus_edit_rates():
    assert edit_distance("kitten", "sitting") == 3
    corpus = metrics(REFERENCES, HYPOTHESES)
    assert math.isclose(corpus["wer"], corpus_rate(REFERENCES, HYPOTHESES, str.split))
    assert math.isclose(corpus["cer"], corpus_rate(REFERENCES, HYPOTHESES, characters))
    assert corpus["exact_match"] == 1 / 5 and corpus["loss"] == 1.0
    for ref, hyp in zip(REFERENCES, HYPOTHESES, strict=True):
        assert math.isclose(metrics([ref], [hyp])["wer"], corpus_rate([ref], [hyp], str.split))
        assert math.isclose(metrics([ref], [hyp])["cer"], corpus_rate([ref], [hyp], characters))
    assert metrics(["one two three"], ["two three"])["wer"] == 1 / 3
    with pytest.raises(ValueError):
        metrics(["a", "b"], ["a"])
