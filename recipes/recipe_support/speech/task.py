"""What the speech recipe holds for one run: the clips of each part, and what differs between tasks and model
families (Wav2Vec2 classification / CTC, Whisper classification / seq2seq recognition)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recipe_support.speech.audio import Clip


@dataclass
class ClipSets:
    """The whole train split (labels / vocabulary come from it), the training clips used, the eval clips."""

    train_split: list[Clip]
    train: list[Clip]
    eval: list[Clip]
    eval_split: str
    held_out: dict[str, Any] | None = None  # how a dataset without an eval split was split


@dataclass
class TaskSetup:
    """What differs between the tasks and model families: head, targets, processor, collator, metrics, checks."""

    head: dict[str, Any]  # build_model's labels= or vocabulary=
    encode: Callable  # clips -> targets (class ids, or token ids)
    processor: Any  # saved with the model
    collator: Any
    eval_step: Any
    compute_metrics: Any
    sampling_rate: int
    max_seconds: float  # longest clip (asr) or where clips are cut (classify)
    cap_name: str = "--max_seconds"
    normalize: bool = True  # per-clip zero mean, unit variance (Wav2Vec2); Whisper takes the raw waveform
    min_samples: int = 1
    whisper: bool = False
