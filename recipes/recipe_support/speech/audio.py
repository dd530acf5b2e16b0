"""Speech clips per split (FSDD; an audiofolder read as a file listing, as ``load_dataset("audiofolder")`` decodes
through torchcodec; a hub dataset, its audio read undecoded), decoded by soundfile."""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_helu.errors import UsageError
from hf_helu.inputs import is_hub_id

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_NAME = re.compile(r"([0-9])_[A-Za-z]+_([0-9]+)\.wav")  # {digit}_{speaker}_{index}: index 0-4 is the test split
SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")  # the default eval split: the first of the last four
TRANSCRIPT_COLUMNS = ("transcript", "text", "sentence", "transcription")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")
HELD_OUT_SPLIT = "held_out"


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


def audiofolder_splits(root: Path) -> dict[str, list[Clip]]:
    """Split folders (none: the whole folder is ``train``), each with a ``metadata.csv`` (``file_name`` and a label
    and/or transcript column) or one subfolder per label."""
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and p.name in SPLIT_NAMES} or {"train": root}
    return {name: _folder_clips(folder) for name, folder in folders.items()}


def _folder_clips(folder: Path) -> list[Clip]:
    metadata = folder / "metadata.csv"
    if not metadata.is_file():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        if any(path.parent == folder for path in files):
            raise UsageError(f"{folder} holds audio files: without a metadata.csv, use one folder per label")
        return [Clip(str(path), label=path.parent.name) for path in files]
    with metadata.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rows, columns = list(reader), reader.fieldnames or []
    text = next((c for c in TRANSCRIPT_COLUMNS if c in columns), None)
    empty = [line for line, row in enumerate(rows, 2) if not row.get("file_name")]
    if "file_name" not in columns or ("label" not in columns and text is None) or empty:
        raise UsageError(
            f"{metadata} needs a file_name on every line (line {empty[:1]} has none) and a label or transcript column "
            f"(one of {list(TRANSCRIPT_COLUMNS)}); columns: {columns}"
        )
    return [Clip(str(folder / row["file_name"]), row.get("label"), row[text] if text else None) for row in rows]


def clips_from_datasets(
    dataset_dict: Mapping[str, Any], name: str, audio_column="audio", label_column="label", text_column=None
) -> dict[str, list[Clip]]:
    """Clips of a ``datasets.DatasetDict`` with an ``Audio`` column; a ``ClassLabel`` gives class names (-1: none)."""
    from datasets import Audio, ClassLabel

    splits = {}
    for split, dataset in dataset_dict.items():
        columns, where = dataset.column_names, f"{name}:{split}"
        texts = text_column or next((c for c in TRANSCRIPT_COLUMNS if c in columns), None)
        labels = label_column if label_column in columns else None
        if audio_column not in columns or (text_column and text_column not in columns) or not (labels or texts):
            raise UsageError(
                f"{where} needs the audio column {audio_column!r} and the label column {label_column!r} or a "
                f"transcript column ({text_column or list(TRANSCRIPT_COLUMNS)}); columns: {columns}"
            )
        feature = dataset.features[labels] if labels else None
        rows = dataset.select_columns([c for c in (audio_column, labels, texts) if c])
        clips = splits[split] = []
        for index, row in enumerate(rows.cast_column(audio_column, Audio(decode=False))):
            label, audio, text = row.get(labels), row[audio_column], row.get(texts)
            if isinstance(feature, ClassLabel) and label is not None:
                label = feature.int2str(label) if label >= 0 else None
            source = audio["path"] if audio["bytes"] is None else f"{where}[{index}]"
            clips.append(Clip(source, None if label is None else str(label), text, audio["bytes"]))
    return splits


def load_splits(dataset: str, config: str | None = None, **columns: Any) -> dict[str, list[Clip]]:
    """Clips per split of ``dataset``: an FSDD folder, an audiofolder, or a hub id (``columns``: the
    :func:`clips_from_datasets` column names)."""
    path = Path(dataset)
    wavs = sorted((path / "recordings" if (path / "recordings").is_dir() else path).glob("*.wav"))
    if wavs and all(FSDD_NAME.fullmatch(p.name) for p in wavs):  # FSDD: the label is the digit, its word the transcript
        splits: dict[str, list[Clip]] = {"train": [], "test": []}
        for wav in wavs:
            digit, index = FSDD_NAME.fullmatch(wav.name).groups()
            splits["test" if int(index) < 5 else "train"].append(Clip(str(wav), digit, DIGIT_WORDS[int(digit)]))
    elif path.is_dir():
        splits = audiofolder_splits(path)
    elif path.exists() or not is_hub_id(str(dataset)):
        raise UsageError(f"dataset {str(dataset)!r} is neither a folder nor a hub id such as 'superb'")
    else:
        from datasets import load_dataset

        hub = load_dataset(dataset, config)
        splits = clips_from_datasets(hub, f"{dataset}/{config}" if config else dataset, **columns)
    empty = [name for name, clips in splits.items() if not clips]
    if not splits or empty:
        raise UsageError(f"dataset {dataset} has no audio clips in split(s) {empty or ['train']}")
    return splits


def pick_eval_split(splits: Mapping[str, list[Clip]], requested: str | None = None) -> str:
    """The requested eval split, or the first of validation/valid/dev/test the dataset has."""
    name = requested or next((s for s in SPLIT_NAMES[1:] if s in splits), "/".join(SPLIT_NAMES[1:]))
    if name not in splits:
        raise UsageError(f"eval split {name!r} not in the dataset's splits {sorted(splits)}")
    return name


def subset_in_order(clips: list[Clip], limit: int | None, seed: int = 0) -> list[Clip]:
    """``limit`` clips drawn at random (fixed ``seed``), in their original order; all of them when None."""
    if limit is None or limit >= len(clips):
        return list(clips)
    return [clips[i] for i in sorted(random.Random(seed).sample(range(len(clips)), limit))]


def stratified_split(clips: list[Clip], eval_fraction: float, seed: int = 0) -> tuple[list, list, dict[str, Any]]:
    """(train clips, eval clips, a description) of a dataset without an eval split: ``Dataset.train_test_split``
    holds out ``ceil(eval_fraction * n)`` clips shared among the classes in proportion to their sizes, with ``seed``;
    both parts keep the original order."""
    from datasets import Dataset

    stratify = "label" if any(clip.label is not None for clip in clips) else None  # no labels: a plain random split
    labels = [str(clip.label) for clip in clips]
    rows = Dataset.from_dict({"index": range(len(clips)), "label": labels}).class_encode_column("label")
    held_size = math.ceil(eval_fraction * len(clips))
    try:
        parts = rows.train_test_split(test_size=held_size, seed=seed, stratify_by_column=stratify)
    except ValueError as error:  # a class of one clip, a part with fewer clips than classes, or an empty part
        raise UsageError(
            f"--eval_fraction {eval_fraction} of {len(clips)} clips ({dict(Counter(labels))} per class): {error}; "
            "add clips or give the dataset an eval split"
        ) from None
    train, held = ([clips[i] for i in sorted(parts[name]["index"])] for name in ("train", "test"))
    description = {"from": "train", "eval_fraction": eval_fraction, "split_seed": seed, "stratified_by": stratify}
    return train, held, {**description, "train_clips": len(train), "eval_clips": len(held)}
