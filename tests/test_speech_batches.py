"""Speech batches (recipe_support.speech.batches): per-clip normalisation then padding give what Wav2Vec2's feature
extractor gives from the raw clips; token labels padded with -100."""

from __future__ import annotations

import numpy as np
import torch
from recipe_support import speech
from speech_helpers import fsdd_files, needs_fsdd


@needs_fsdd
def test_normalisation_padding_and_mask_match_wav2vec2_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    clips = [speech.Clip(str(p)) for p in fsdd_files(["3_theo_7.wav", "0_george_0.wav", "9_lucas_20.wav"])]
    raw = [speech.resample(*speech.read_audio(c)) for c in clips]
    assert len({len(w) for w in raw}) == 3
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True)
    expected = extractor(raw, sampling_rate=16000, padding=True, return_tensors="pt")
    batch = speech.SpeechCollator(extractor)([{"input_values": speech.load_waveform(c), "labels": 0} for c in clips])
    torch.testing.assert_close(batch["input_values"], expected["input_values"], atol=1e-5, rtol=1e-5)
    assert batch["attention_mask"].tolist() == [[1] * len(w) + [0] * (max(map(len, raw)) - len(w)) for w in raw]
    no_mask = Wav2Vec2FeatureExtractor(return_attention_mask=False, padding_value=0.5)
    rows = [{"input_values": np.ones(3), "labels": 1}, {"input_values": [2], "labels": 0}]
    batch = speech.SpeechCollator(no_mask)(rows)
    assert set(batch) == {"input_values", "labels"} and batch["labels"].tolist() == [1, 0]
    assert batch["input_values"].tolist() == [[1, 1, 1], [2, 0.5, 0.5]]


def test_token_labels_pad_with_minus_100():
    from transformers import Wav2Vec2FeatureExtractor

    batch = speech.SpeechCollator(Wav2Vec2FeatureExtractor(return_attention_mask=True))(
        [{"input_values": np.zeros(5), "labels": [3, 4]}, {"input_values": np.zeros(2), "labels": [5, 6, 7]}]
    )
    assert batch["labels"].tolist() == [[3, 4, -100], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
