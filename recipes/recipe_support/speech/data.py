"""Speech datasets as lists of :class:`~recipe_support.speech.audio.Clip` per split, from:

- the Free Spoken Digit Dataset (``{digit}_{speaker}_{index}.wav``; index 0-4 is the test split),
- a local folder in the ``datasets`` audiofolder convention (split folders optional; labels from label subfolders,
  or a ``metadata.csv`` with ``file_name`` plus ``label`` and/or ``transcript``),
- a hub dataset (online only) through ``datasets.load_dataset``, with audio decoded later by soundfile.
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
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")
SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")
EVAL_SPLIT_PREFERENCE = ("validation", "valid", "dev", "test")
METADATA_FILE = "metadata.csv"
TRANSCRIPT_COLUMNS = ("transcript", "text", "sentence", "transcription")


def is_fsdd_folder(root: str | os.PathLike) -> bool:
    """True for the FSDD layout: ``root/recordings/*.wav`` (or ``root/*.wav``) named ``{digit}_{speaker}_{index}``."""
    root = Path(root)
    folder = root / "recordings" if (root / "recordings").is_dir() else root
    names = [p.name for p in folder.glob("*.wav")]
    return bool(names) and all(FSDD_NAME.match(name) for name in names)


def fsdd_splits(root: str | os.PathLike) -> dict[str, list[Clip]]:
    """FSDD's standard split: index 0-4 is ``test``, 5-49 ``train``; label = digit, transcript = its English word."""
    root = Path(root)
    folder = root / "recordings" if (root / "recordings").is_dir() else root
    if not folder.is_dir():
        raise UsageError(f"FSDD folder {folder} does not exist")
    splits: dict[str, list[Clip]] = {"train": [], "test": []}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        match = FSDD_NAME.match(path.name)
        if match is None:
            raise UsageError(f"{path} is not named like an FSDD recording ({{digit}}_{{speaker}}_{{index}}.wav)")
        digit = int(match["digit"])
        split = "test" if int(match["index"]) in FSDD_TEST_INDICES else "train"
        splits[split].append(Clip(source=str(path), label=str(digit), transcript=DIGIT_WORDS[digit]))
    return _check_not_empty(splits, folder)


def audiofolder_splits(root: str | os.PathLike) -> dict[str, list[Clip]]:
    """A folder in the ``datasets`` audiofolder convention.

    Split folders (``train``, ``validation``/``valid``/``dev``, ``test``) are optional: without them the
    whole folder is ``train``. In each split, a ``metadata.csv`` (``file_name`` plus ``label`` and/or
    ``transcript``/``text``) describes the clips; without one, each audio file's parent folder is its label.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"dataset folder {root} does not exist")
    split_dirs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and p.name in SPLIT_NAMES}
    if not split_dirs:
        split_dirs = {"train": root}
    splits = {name: _audiofolder_split(folder) for name, folder in split_dirs.items()}
    return _check_not_empty(splits, root)


def _audiofolder_split(folder: Path) -> list[Clip]:
    metadata = folder / METADATA_FILE
    if metadata.is_file():
        return _clips_from_metadata(metadata)
    clips = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in AUDIO_EXTENSIONS or not path.is_file():
            continue
        if path.parent == folder:
            raise UsageError(
                f"{path} lies directly in {folder}: without a {METADATA_FILE}, audio files must sit in "
                "one subfolder per label"
            )
        clips.append(Clip(source=str(path), label=path.parent.name))
    return clips


def _clips_from_metadata(metadata: Path) -> list[Clip]:
    with metadata.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        if "file_name" not in columns:
            raise UsageError(f"{metadata} has no 'file_name' column (columns: {columns})")
        text_column = next((c for c in TRANSCRIPT_COLUMNS if c in columns), None)
        if "label" not in columns and text_column is None:
            raise UsageError(
                f"{metadata} has neither a 'label' column nor a transcript column "
                f"(one of {list(TRANSCRIPT_COLUMNS)}); columns: {columns}"
            )
        clips = []
        for line, row in enumerate(reader, start=2):
            if not row["file_name"]:
                raise UsageError(f"{metadata}, line {line}: empty file_name")
            clips.append(
                Clip(
                    source=str(metadata.parent / row["file_name"]),
                    label=row["label"] if "label" in columns else None,
                    transcript=row[text_column] if text_column else None,
                )
            )
    return clips


def hub_splits(
    name: str,
    config: str | None = None,
    audio_column: str = "audio",
    label_column: str = "label",
    text_column: str | None = None,
    **load_kwargs: Any,
) -> dict[str, list[Clip]]:
    """A hub dataset (online only) via ``datasets.load_dataset``; audio is decoded later by soundfile."""
    import datasets

    dataset_dict = datasets.load_dataset(name, config, **load_kwargs)
    display = f"{name}/{config}" if config else name
    return clips_from_datasets(dataset_dict, display, audio_column, label_column, text_column)


def clips_from_datasets(
    dataset_dict: Mapping[str, Any],
    display_name: str,
    audio_column: str = "audio",
    label_column: str = "label",
    text_column: str | None = None,
) -> dict[str, list[Clip]]:
    """Clips of a ``datasets.DatasetDict`` whose ``audio_column`` is an ``Audio`` feature.

    The column is read undecoded (``Audio(decode=False)``), so soundfile, not torchcodec, decodes it.
    A ``ClassLabel`` label column gives its class names.
    """
    from datasets import Audio, ClassLabel

    splits = {}
    for split, dataset in dataset_dict.items():
        if audio_column not in dataset.column_names:
            raise UsageError(f"{display_name}:{split} has no audio column {audio_column!r} ({dataset.column_names})")
        transcripts = text_column or next((c for c in TRANSCRIPT_COLUMNS if c in dataset.column_names), None)
        if text_column is not None and text_column not in dataset.column_names:
            raise UsageError(f"{display_name}:{split} has no column {text_column!r} ({dataset.column_names})")
        labels = label_column if label_column in dataset.column_names else None
        if labels is None and transcripts is None:
            raise UsageError(
                f"{display_name}:{split} has neither a label column {label_column!r} nor a transcript column "
                f"(one of {list(TRANSCRIPT_COLUMNS)}); columns: {dataset.column_names}"
            )
        names = dataset.features[labels].names if labels and isinstance(dataset.features[labels], ClassLabel) else None
        keep = [audio_column] + [c for c in (labels, transcripts) if c]
        rows = dataset.select_columns(keep).cast_column(audio_column, Audio(decode=False))
        clips = []
        for index, row in enumerate(rows):
            audio, label = row[audio_column], row[labels] if labels else None
            if names is not None and label is not None:
                label = names[label] if label >= 0 else None  # ClassLabel -1: no label
            data, path = audio.get("bytes"), audio.get("path")
            name = f"{display_name}:{split}[{index}]" + (f" ({path})" if path else "")
            clips.append(
                Clip(
                    source=path if data is None and path else name,
                    label=None if label is None else str(label),
                    transcript=row[transcripts] if transcripts else None,
                    data=data,
                )
            )
        splits[split] = clips
    return _check_not_empty(splits, display_name)


def load_splits(dataset: str | os.PathLike, config: str | None = None, **hub_kwargs: Any) -> dict[str, list[Clip]]:
    """Clips per split of ``dataset``: an FSDD folder, an audiofolder, or else a hub dataset id."""
    path = Path(dataset)
    if path.is_dir():
        return fsdd_splits(path) if is_fsdd_folder(path) else audiofolder_splits(path)
    if path.exists() or not is_hub_id(str(dataset)):
        raise UsageError(f"dataset {str(dataset)!r} is neither a folder nor a hub id such as 'superb'")
    return hub_splits(str(dataset), config, **hub_kwargs)


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
    chosen = sorted(random.Random(seed).sample(range(len(clips)), limit))
    return [clips[i] for i in chosen]


def _check_not_empty(splits: dict[str, list[Clip]], where: object) -> dict[str, list[Clip]]:
    empty = [name for name, clips in splits.items() if not clips]
    if not splits or empty:
        raise UsageError(f"dataset {where} has no audio clips in split(s) {empty or ['train']}")
    return splits


HELD_OUT_SPLIT = "held_out"


def stratified_split(
    clips: Sequence[Clip], eval_fraction: float, seed: int = 0
) -> tuple[list[Clip], list[Clip], dict[str, Any]]:
    """(train clips, eval clips, a description) of a dataset without an eval split.

    ``sklearn.model_selection.train_test_split`` holds out ``ceil(eval_fraction * n)`` clips, shared among the classes
    in proportion to their sizes (clips without labels: one group, a plain random split), with ``seed``; both parts
    keep the original order. A class of fewer than 2 clips cannot be split and is an error naming it.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < eval_fraction < 1:
        raise UsageError(f"--eval_fraction must be in (0, 1), got {eval_fraction}")
    labels = [clip.label for clip in clips]
    counts = Counter(labels)
    for label, count in sorted(counts.items(), key=lambda item: str(item[0])):
        if count < 2:
            source = next(clip.source for clip in clips if clip.label == label)
            raise UsageError(
                f"class {label!r} has {count} clip ({source!r}): a held-out split needs at least 2 clips per class; "
                "add clips or give the dataset an eval split"
            )
    stratified = len(counts) > 1 or None not in counts
    held_count = math.ceil(eval_fraction * len(clips))
    if stratified and min(held_count, len(clips) - held_count) < len(counts):
        raise UsageError(
            f"--eval_fraction {eval_fraction} of {len(clips)} clips leaves a part with fewer clips than the "
            f"{len(counts)} classes; choose a fraction nearer 0.5 or give the dataset an eval split"
        )
    groups = [str(label) for label in labels] if stratified else None
    train_idx, held_idx = train_test_split(range(len(clips)), test_size=held_count, random_state=seed, stratify=groups)
    train = [clips[i] for i in sorted(train_idx)]
    held = [clips[i] for i in sorted(held_idx)]
    description = {
        "from": "train",
        "eval_fraction": eval_fraction,
        "split_seed": seed,
        "stratified_by": "label" if stratified else None,
        "train_clips": len(train),
        "eval_clips": len(held),
    }
    return train, held, description
