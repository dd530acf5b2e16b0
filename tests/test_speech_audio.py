"""Audio (recipe_support.speech.audio.load_waveform): resampling, decode errors naming the file; the length cap and the
per-clip normalisation of a classification dataset (TaskSetup.dataset, then the collator)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from recipe_support import speech
from speech_helpers import RECORDINGS, needs_fsdd

from hf_helu.errors import UsageError

pytestmark = needs_fsdd


def test_resampling_8k_to_16k_keeps_a_tone(tmp_path):
    seconds, freq = 0.5, 440.0
    t8 = np.arange(int(8000 * seconds)) / 8000
    sf.write(tmp_path / "tone.wav", np.sin(2 * np.pi * freq * t8).astype(np.float32), 8000, subtype="FLOAT")
    up = speech.load_waveform(speech.Clip(str(tmp_path / "tone.wav")), 16000)
    t16 = np.arange(len(up)) / 16000
    assert len(up) == 2 * len(t8) and up.dtype == np.float32
    middle = slice(400, -400)  # away from the filter's edge effects
    np.testing.assert_allclose(up[middle], np.sin(2 * np.pi * freq * t16)[middle], atol=2e-3)


def test_classification_cuts_long_clips_then_normalises_the_cut_clip():
    from transformers import Wav2Vec2FeatureExtractor

    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True)
    setup = speech.TaskSetup({"labels": ["0"]}, extractor, speech.SpeechCollator(extractor), None, None, 0.1)
    clip = speech.Clip(str(RECORDINGS / "0_george_0.wav"), label="0")
    full = speech.load_waveform(clip)
    (row,) = setup.dataset([clip])
    assert len(row["input_values"]) == 1600 < len(full) and row["labels"] == 0
    cut = full[:1600].astype(np.float64)
    expected = (cut - cut.mean()) / np.sqrt(cut.var() + 1e-7)
    np.testing.assert_allclose(setup.collator([row])["input_values"][0].numpy(), expected, atol=1e-5)


def test_unreadable_audio_names_the_file(tmp_path):
    bad = tmp_path / "label" / "broken.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"RIFF not really a wave file")
    (clip,) = speech.load_splits(tmp_path)["train"]
    with pytest.raises(UsageError, match=r"cannot decode audio .*broken\.wav"):
        speech.load_waveform(clip)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_sample_is_rejected_naming_the_file(tmp_path, bad):
    path = tmp_path / "label" / "poisoned.wav"
    path.parent.mkdir()
    samples = np.sin(np.arange(800, dtype=np.float32) / 10)
    samples[123] = bad
    sf.write(path, samples, 8000, subtype="FLOAT")
    (clip,) = speech.load_splits(tmp_path)["train"]
    with pytest.raises(
        UsageError, match=r"poisoned\.wav.* 1 non-finite sample\(s\) \(NaN or inf\), the first at sample 123"
    ):
        speech.load_waveform(clip)
