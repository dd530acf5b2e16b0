"""Speech metrics (hf_helu.training.speech.metrics): WER and CER against jiwer."""

from __future__ import annotations

import math

import jiwer
import pytest

from hf_helu.training import speech

REFERENCES = ["the cat sat on the mat", "seven", "one two three", "hello world", "a b c d"]
HYPOTHESES = ["the cat sit on mat", "seven", "one too three four", "", "a  b x d e"]


def test_wer_and_cer_match_jiwer():
    assert math.isclose(speech.word_error_rate(REFERENCES, HYPOTHESES), jiwer.wer(REFERENCES, HYPOTHESES))
    assert math.isclose(speech.char_error_rate(REFERENCES, HYPOTHESES), jiwer.cer(REFERENCES, HYPOTHESES))
    for ref, hyp in zip(REFERENCES, HYPOTHESES, strict=True):
        assert math.isclose(speech.word_error_rate(ref, hyp), jiwer.wer(ref, hyp))
        assert math.isclose(speech.char_error_rate(ref, hyp), jiwer.cer(ref, hyp))
    assert speech.word_error_rate("one two three", "two three") == 1 / 3
    assert speech.edit_distance("kitten", "sitting") == 3
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        speech.word_error_rate(["a", "b"], ["a"])
