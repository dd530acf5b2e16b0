"""Speech datasets as lists of :class:`~recipe_support.speech.audio.Clip` per split, from:

- the Free Spoken Digit Dataset (``{digit}_{speaker}_{index}.wav``; index 0-4 is the test split),
- a local folder in the ``datasets`` audiofolder convention (split folders optional; labels from label subfolders,
  or a ``metadata.csv`` with ``file_name`` plus ``label`` and/or ``transcript``), read as a file listing:
  ``load_dataset("audiofolder")`` encodes every file through torchcodec (FFmpeg), even with ``decode=False``;
- a hub dataset (online only) through ``datasets.load_dataset``.

Audio columns are read undecoded (``Audio(decode=False)``): soundfile decodes them, not torchcodec/FFmpeg.
"""

from __future__ import annotations

import csv
import math
import os
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hf_helu.errors import UsageError
from hf_helu.inputs import is_hub_id
from recipe_support.speech.audio import Clip

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_NAME = re.compile(r"^(?P<digit>[0-9])_(?P<speaker>[A-Za-z]+)_(?P<index>[0-9]+)\.wav$")
FSDD_TEST_INDICES = range(0, 5)
EVAL_SPLIT_PREFERENCE = ("validation", "valid", "dev", "test")
TRANSCRIPT_COLUMNS = ("transcript", "text", "sentence", "transcription")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")
SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")
METADATA_FILE = "metadata.csv"
HELD_OUT_SPLIT = "held_out"


def _recordings(root: Path) -> Path:
    return root / "recordings" if (root / "recordings").is_dir() else root


def is_fsdd_folder(root: str | os.PathLike) -> bool:
    """True for the FSDD layout: ``root/recordings/*.wav`` (or ``root/*.wav``) named ``{digit}_{speaker}_{index}``."""
    names = [p.name for p in _recordings(Path(root)).glob("*.wav")]
    return bool(names) and all(FSDD_NAME.match(name) for name in names)


def fsdd_splits(root: str | os.PathLike) -> dict[str, list[Clip]]:
    """FSDD's standard split: index 0-4 is ``test``, 5-49 ``train``; label = digit, transcript = its English word."""
    splits: dict[str, list[Clip]] = {"train": [], "test": []}
    for path in sorted(_recordings(Path(root)).glob("*.wav")):
        match = FSDD_NAME.match(path.name)
        split = "test" if int(match["index"]) in FSDD_TEST_INDICES else "train"
        digit = int(match["digit"])
        splits[split].append(Clip(source=str(path), label=str(digit), transcript=DIGIT_WORDS[digit]))
    return splits


def audiofolder_splits(root: Path) -> dict[str, list[Clip]]:
    """Split folders (``train``, ``validation``/``valid``/``dev``, ``test``; without them the whole folder is
    ``train``), each described by a ``metadata.csv`` or, without one, by one subfolder per label."""
    split_dirs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and p.name in SPLIT_NAMES}
    return {name: _audiofolder_split(folder) for name, folder in (split_dirs or {"train": root}).items()}


def _audiofolder_split(folder: Path) -> list[Clip]:
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        with metadata.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows, columns = list(reader), reader.fieldnames or []
        text = next((c for c in TRANSCRIPT_COLUMNS if c in columns), None)
        if "file_name" not in columns or ("label" not in columns and text is None):
            raise UsageError(
                f"{metadata} needs a 'file_name' column and a 'label' or transcript column (one of "
                f"{list(TRANSCRIPT_COLUMNS)}); columns: {columns}"
            )
        empty = [line for line, row in enumerate(rows, 2) if not row["file_name"]]
        if empty:
            raise UsageError(f"{metadata}, line {empty[0]}: empty file_name")
        return [Clip(str(folder / r["file_name"]), r.get("label"), r[text] if text else None) for r in rows]
    clips = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()):
        if path.parent == folder:
            raise UsageError(f"{path} lies directly in {folder}: without a {METADATA_FILE}, use one folder per label")
        clips.append(Clip(source=str(path), label=path.parent.name))
    return clips


def clips_from_datasets(
    dataset_dict: Mapping[str, Any],
    display_name: str,
    audio_column: str = "audio",
    label_column: str = "label",
    text_column: str | None = None,
) -> dict[str, list[Clip]]:
    """Clips of a ``datasets.DatasetDict`` whose ``audio_column`` is an ``Audio`` feature, read undecoded; a
    ``ClassLabel`` label column gives its class names (-1: no label)."""
    from datasets import Audio, ClassLabel

    splits = {}
    for split, dataset in dataset_dict.items():
        columns, where = dataset.column_names, f"{display_name}:{split}"
        if audio_column not in columns:
            raise UsageError(f"{where} has no audio column {audio_column!r} ({columns})")
        if text_column is not None and text_column not in columns:
            raise UsageError(f"{where} has no column {text_column!r} ({columns})")
        texts = text_column or next((c for c in TRANSCRIPT_COLUMNS if c in columns), None)
        labels = label_column if label_column in columns else None
        if labels is None and texts is None:
            raise UsageError(
                f"{where} has neither a label column {label_column!r} nor a transcript column "
                f"(one of {list(TRANSCRIPT_COLUMNS)}); columns: {columns}"
            )
        feature = dataset.features[labels] if labels else None
        rows = dataset.select_columns([c for c in (audio_column, labels, texts) if c])
        clips = []
        for index, row in enumerate(rows.cast_column(audio_column, Audio(decode=False))):
            label, audio = row[labels] if labels else None, row[audio_column]
            if isinstance(feature, ClassLabel) and label is not None:
                label = feature.int2str(label) if label >= 0 else None
            data, path = audio.get("bytes"), audio.get("path")
            name = f"{where}[{index}]" + (f" ({path})" if path else "")
            label, text = None if label is None else str(label), row[texts] if texts else None
            clips.append(Clip(path if data is None and path else name, label, text, data))
        splits[split] = clips
    return splits


def load_splits(dataset: str | os.PathLike, config: str | None = None, **hub_kwargs: Any) -> dict[str, list[Clip]]:
    """Clips per split of ``dataset``: an FSDD folder, an audiofolder, or else a hub dataset id (``hub_kwargs``:
    ``audio_column``, ``label_column``, ``text_column``)."""
    path = Path(dataset)
    columns = {k: hub_kwargs.pop(k) for k in ("audio_column", "label_column", "text_column") if k in hub_kwargs}
    if path.is_dir() and is_fsdd_folder(path):
        splits = fsdd_splits(path)
    elif path.is_dir():
        splits = audiofolder_splits(path)
    elif path.exists() or not is_hub_id(str(dataset)):
        raise UsageError(f"dataset {str(dataset)!r} is neither a folder nor a hub id such as 'superb'")
    else:
        from datasets import load_dataset

        hub = load_dataset(str(dataset), config, **hub_kwargs)
        splits = clips_from_datasets(hub, f"{dataset}/{config}" if config else str(dataset), **columns)
    empty = [name for name, clips in splits.items() if not clips]
    if not splits or empty:
        raise UsageError(f"dataset {dataset} has no audio clips in split(s) {empty or ['train']}")
    return splits


def pick_eval_split(splits: Mapping[str, Sequence[Clip]], requested: str | None = None) -> str:
    """The requested eval split, or the first of validation/valid/dev/test the dataset has."""
    if requested is not None:
        if requested not in splits:
            raise UsageError(f"eval split {requested!r} not in the dataset's splits {sorted(splits)}")
        return requested
    for name in EVAL_SPLIT_PREFERENCE:
        if name in splits:
            return name
    raise UsageError(f"the dataset has no eval split (one of {list(EVAL_SPLIT_PREFERENCE)}); splits: {sorted(splits)}")


def subset_in_order(clips: Sequence[Clip], limit: int | None, seed: int = 0) -> list[Clip]:
    """``limit`` clips drawn at random (fixed ``seed``), in their original order; all of them when None."""
    if limit is None or limit >= len(clips):
        return list(clips)
    if limit <= 0:
        raise UsageError(f"sample limit must be > 0, got {limit}")
    return [clips[i] for i in sorted(random.Random(seed).sample(range(len(clips)), limit))]


def stratified_split(
    clips: Sequence[Clip], eval_fraction: float, seed: int = 0
) -> tuple[list[Clip], list[Clip], dict[str, Any]]:
    """(train clips, eval clips, a description) of a dataset without an eval split.

    ``Dataset.train_test_split(stratify_by_column="label")`` holds out ``ceil(eval_fraction * n)`` clips, shared
    among the classes in proportion to their sizes (clips without labels: a plain random split), with ``seed``;
    both parts keep the original order. A class of fewer than 2 clips is an error naming it.
    """
    from datasets import ClassLabel, Dataset

    if not 0 < eval_fraction < 1:
        raise UsageError(f"--eval_fraction must be in (0, 1), got {eval_fraction}")
    labels = [str(clip.label) for clip in clips]
    counts = Counter(labels)
    for label, count in sorted(counts.items()):
        if count < 2:
            source = next(clip.source for clip in clips if str(clip.label) == label)
            raise UsageError(
                f"class {label!r} has {count} clip ({source!r}): a held-out split needs at least 2 clips per class; "
                "add clips or give the dataset an eval split"
            )
    stratified = any(clip.label is not None for clip in clips)
    held_count = math.ceil(eval_fraction * len(clips))
    if stratified and min(held_count, len(clips) - held_count) < len(counts):
        raise UsageError(
            f"--eval_fraction {eval_fraction} of {len(clips)} clips leaves a part with fewer clips than the "
            f"{len(counts)} classes; choose a fraction nearer 0.5 or give the dataset an eval split"
        )
    rows = Dataset.from_dict({"index": range(len(clips)), "label": labels})
    rows = rows.cast_column("label", ClassLabel(names=sorted(counts)))
    parts = rows.train_test_split(test_size=held_count, seed=seed, stratify_by_column="label" if stratified else None)
    train, held = ([clips[i] for i in sorted(parts[name]["index"])] for name in ("train", "test"))
    description = {"from": "train", "eval_fraction": eval_fraction, "split_seed": seed}
    description |= {"stratified_by": "label" if stratified else None, "train_clips": len(train)}
    return train, held, {**description, "eval_clips": len(held)}
