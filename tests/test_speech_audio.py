"""Audio (recipe_support.speech.audio): resampling, the length cap, decode errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from recipe_support import speech
from speech_helpers import RECORDINGS, needs_fsdd

from hf_helu.errors import UsageError

pytestmark = needs_fsdd


def test_resampling_8k_to_16k_keeps_a_tone():
    seconds, freq = 0.5, 440.0
    t8 = np.arange(int(8000 * seconds)) / 8000
    up = speech.resample(np.sin(2 * np.pi * freq * t8).astype(np.float32), 8000, 16000)
    t16 = np.arange(len(up)) / 16000
    assert len(up) == 2 * len(t8)
    middle = slice(400, -400)  # away from the filter's edge effects
    np.testing.assert_allclose(up[middle], np.sin(2 * np.pi * freq * t16)[middle], atol=2e-3)


def test_length_cap_truncates_before_normalising():
    clip = speech.Clip(str(RECORDINGS / "0_george_0.wav"))
    full = speech.load_waveform(clip, do_normalize=False)
    capped = speech.load_waveform(clip, max_seconds=0.1)
    assert len(capped) == 1600 < len(full)
    np.testing.assert_allclose(capped, (full[:1600] - full[:1600].mean()) / np.sqrt(full[:1600].var() + 1e-7))


def test_unreadable_audio_names_the_file(tmp_path):
    bad = tmp_path / "label" / "broken.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"RIFF not really a wave file")
    (clip,) = speech.load_splits(tmp_path)["train"]
    with pytest.raises(UsageError, match=r"broken\.wav"):
        speech.load_waveform(clip)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_sample_is_rejected_naming_the_file(tmp_path, bad):
    import soundfile as sf

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
