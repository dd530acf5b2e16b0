"""Speech batches (recipe_support.speech.tasks): the collator normalises each clip over its own samples, then pads
(an attention mask only where the extractor uses one); token labels padded with -100; calibration batches unpadded."""

from __future__ import annotations

import numpy as np
import torch
from recipe_support import speech
from speech_helpers import fsdd_files, needs_fsdd


def normalised(waveform) -> np.ndarray:
    """Zero mean, unit variance over the clip (the independent reference of Wav2Vec2's normalisation)."""
    waveform = np.asarray(waveform, dtype=np.float64)
    return (waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)


@needs_fsdd
def test_each_clip_is_normalised_over_its_own_samples_then_padded():
    from transformers import Wav2Vec2FeatureExtractor

    raw = [speech.load_waveform(speech.Clip(str(p))) for p in fsdd_files(["3_theo_7.wav", "0_george_0.wav"])]
    longest = max(map(len, raw))
    for mask in (True, False):  # a checkpoint without a mask (wav2vec2-base) still gets per-clip normalisation
        extractor = Wav2Vec2FeatureExtractor(return_attention_mask=mask, padding_value=0.5)
        batch = speech.SpeechCollator(extractor)([{"input_values": w, "labels": i} for i, w in enumerate(raw)])
        assert ("attention_mask" in batch) == mask and batch["labels"].tolist() == [0, 1]
        for row, waveform in zip(batch["input_values"].numpy(), raw, strict=True):
            np.testing.assert_allclose(row[: len(waveform)], normalised(waveform), atol=1e-4)
            assert (row[len(waveform) :] == 0.5).all() and len(row) == longest
        if mask:
            assert batch["attention_mask"].tolist() == [[1] * len(w) + [0] * (longest - len(w)) for w in raw]


def test_token_labels_pad_with_minus_100():
    from transformers import Wav2Vec2FeatureExtractor

    batch = speech.SpeechCollator(Wav2Vec2FeatureExtractor(return_attention_mask=True))(
        [{"input_values": np.zeros(5), "labels": [3, 4]}, {"input_values": np.zeros(2), "labels": [5, 6, 7]}]
    )
    assert batch["labels"].tolist() == [[3, 4, -100], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_calibration_batches_hold_clips_of_one_length_without_a_mask():
    from transformers import Wav2Vec2FeatureExtractor

    collator = speech.SpeechCollator(Wav2Vec2FeatureExtractor(return_attention_mask=True))
    rng = np.random.default_rng(0)
    rows = [{"input_values": rng.standard_normal(n).astype(np.float32), "labels": 0} for n in (5, 7, 5, 5, 9)]
    batches = speech.calibration_batches(rows, collator, samples=4, batch_size=2)
    assert [tuple(b["input_values"].shape) for b in batches] == [(2, 5), (1, 5), (1, 7)]  # the first 4 clips only
    assert all(set(b) == {"input_values", "labels"} for b in batches)
    torch.testing.assert_close(
        batches[2]["input_values"][0], torch.as_tensor(normalised(rows[1]["input_values"])).float()
    )
