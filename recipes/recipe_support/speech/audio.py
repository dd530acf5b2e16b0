"""Audio decoding with soundfile (no FFmpeg, no torchcodec) and polyphase resampling to the model's rate."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from hf_helu.errors import UsageError


@dataclass(frozen=True)
class Clip:
    """One example: its audio file (or a display name when ``data`` holds the encoded audio), label and transcript."""

    source: str
    label: str | None = None
    transcript: str | None = None
    data: bytes | None = None


def load_waveform(clip: Clip, sampling_rate: int = 16_000) -> np.ndarray:
    """Mono float32 samples at ``sampling_rate`` (``scipy.signal.resample_poly``); bad audio raises naming the clip."""
    import soundfile as sf
    from scipy.signal import resample_poly

    try:
        waveform, rate = sf.read(io.BytesIO(clip.data) if clip.data else clip.source, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, TypeError, OSError...
        raise UsageError(f"cannot decode audio {clip.source!r}: {error}") from error
    bad = ~np.isfinite(waveform).all(axis=1)
    if bad.any():  # float WAVs can hold NaN/inf: they would train to a NaN loss
        raise UsageError(
            f"audio {clip.source!r} has {int(bad.sum())} non-finite sample(s) (NaN or inf), the first at sample "
            f"{int(bad.argmax())}"
        )
    waveform = waveform.mean(axis=1, dtype=np.float32)
    return waveform if rate == sampling_rate else resample_poly(waveform, sampling_rate, rate).astype(np.float32)
