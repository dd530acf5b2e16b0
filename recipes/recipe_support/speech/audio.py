"""Audio for the speech recipe: decode with soundfile (no FFmpeg, no torchcodec), resample to the model's rate with a
polyphase filter (``scipy.signal.resample_poly``), cap the length, normalise per clip to zero mean and unit variance
exactly as ``Wav2Vec2FeatureExtractor`` does.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np

from hf_helu.errors import UsageError

SAMPLING_RATE = 16_000


@dataclass(frozen=True)
class Clip:
    """One example: where its audio is, and its class label and/or transcript.

    ``source`` is a file path, or a display name (``"superb/ks:train[12]"``) when the audio comes as
    encoded ``data`` bytes from a hub dataset.
    """

    source: str
    label: str | None = None
    transcript: str | None = None
    data: bytes | None = None


def read_audio(clip: Clip | str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a clip to a mono float32 waveform and its sampling rate; raise naming the file on failure."""
    import soundfile as sf

    if not isinstance(clip, Clip):
        clip = Clip(source=os.fspath(clip))
    source = io.BytesIO(clip.data) if clip.data is not None else clip.source
    try:
        waveform, rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, TypeError, OSError...
        raise UsageError(f"cannot decode audio {clip.source!r}: {error}") from error
    if waveform.shape[0] == 0:
        raise UsageError(f"audio {clip.source!r} has no samples")
    finite = np.isfinite(waveform).all(axis=1)
    if not finite.all():  # float WAVs can hold NaN/inf: they would train to a NaN loss
        first = int(np.argmin(finite))
        raise UsageError(
            f"audio {clip.source!r} has {int((~finite).sum())} non-finite sample(s) (NaN or inf), the first at "
            f"sample {first}"
        )
    return waveform.mean(axis=1, dtype=np.float32), int(rate)


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Resample with a polyphase anti-aliasing filter (``scipy.signal.resample_poly``)."""
    from scipy.signal import resample_poly

    if orig_rate <= 0 or target_rate <= 0:
        raise UsageError(f"sampling rates must be positive, got {orig_rate} -> {target_rate}")
    if orig_rate == target_rate:
        return np.asarray(waveform, dtype=np.float32)
    common = math.gcd(orig_rate, target_rate)
    return resample_poly(waveform, target_rate // common, orig_rate // common).astype(np.float32)


def normalize(waveform: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the clip: ``Wav2Vec2FeatureExtractor(do_normalize=True)``'s own function."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm([np.asarray(waveform, dtype=np.float32)], None)[0]


def load_waveform(
    clip: Clip,
    sampling_rate: int = SAMPLING_RATE,
    max_seconds: float | None = None,
    do_normalize: bool = True,
) -> np.ndarray:
    """The model input of one clip: decoded, mono, resampled, cut to ``max_seconds``, normalised."""
    waveform, rate = read_audio(clip)
    waveform = resample(waveform, rate, sampling_rate)
    if max_seconds is not None:
        waveform = waveform[: max_samples(max_seconds, sampling_rate)]
    return normalize(waveform) if do_normalize else waveform


def max_samples(max_seconds: float, sampling_rate: int = SAMPLING_RATE) -> int:
    if not max_seconds > 0:
        raise UsageError(f"max_seconds must be > 0, got {max_seconds!r}")
    return round(max_seconds * sampling_rate)


def load_waveforms(
    clips: list[Clip],
    sampling_rate: int,
    max_seconds: float,
    *,
    cut: bool,
    do_normalize: bool = True,
    min_samples: int = 1,
    cap_name: str = "--max_seconds",
) -> list[np.ndarray]:
    """Every clip decoded (:func:`load_waveform`) and checked, so bad data fails before any training.

    ``cut``: clips over ``max_seconds`` are cut (classification); else such a clip is an error (speech
    recognition: a cut transcript would no longer match; ``cap_name`` says where the cap comes from). A clip
    shorter than ``min_samples`` (what the model's feature encoder needs for one frame) is an error naming it.
    """
    cap = max_samples(max_seconds, sampling_rate)
    result = []
    for clip in clips:
        waveform = load_waveform(clip, sampling_rate, max_seconds if cut else None, do_normalize)
        if len(waveform) > cap:
            raise UsageError(
                f"clip {clip.source!r} lasts {len(waveform) / sampling_rate:.2f} s, over {cap_name} {max_seconds:g}: "
                "speech recognition does not cut clips (the transcript would no longer match)"
            )
        if len(waveform) < min_samples:
            raise UsageError(
                f"clip {clip.source!r} has {len(waveform)} samples at {sampling_rate} Hz "
                f"({len(waveform) / sampling_rate * 1000:.1f} ms): the model's feature encoder needs at least "
                f"{min_samples} samples ({min_samples / sampling_rate * 1000:.1f} ms) for one frame; drop or pad it"
            )
        result.append(waveform)
    return result
