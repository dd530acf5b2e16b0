"""Speech data, metrics and models for the Wav2Vec2 recipe (``recipes/speech.py``).

Audio is decoded with soundfile (no FFmpeg, no torchcodec), resampled to the model's rate with a
polyphase filter (``scipy.signal.resample_poly``), capped in length, and normalised per clip to zero
mean and unit variance exactly as ``Wav2Vec2FeatureExtractor`` does. Datasets come from:

- the Free Spoken Digit Dataset (``{digit}_{speaker}_{index}.wav``; index 0-4 is the test split),
- a local folder in the ``datasets`` audiofolder convention (split folders optional; labels from
  label subfolders, or a ``metadata.csv`` with ``file_name`` plus ``label`` and/or ``transcript``),
- a hub dataset (online only) through ``datasets.load_dataset``, with audio decoded here by soundfile.

Every example is a :class:`Clip`; the recipe turns clips into padded batches with :class:`SpeechCollator`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLING_RATE = 16_000
TASKS = ("classify", "asr")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_NAME = re.compile(r"^(?P<digit>[0-9])_(?P<speaker>[A-Za-z]+)_(?P<index>[0-9]+)\.wav$")
FSDD_TEST_INDICES = range(0, 5)
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff")
SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")
EVAL_SPLIT_PREFERENCE = ("validation", "valid", "dev", "test")
METADATA_FILE = "metadata.csv"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
TRANSCRIPT_COLUMNS = ("transcript", "text", "sentence", "transcription")

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
WORD_DELIMITER = "|"


class AudioDecodeError(ValueError):
    """An audio file (named in the message) could not be decoded."""


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


# --- audio ---------------------------------------------------------------------------------------


def read_audio(clip: Clip | str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode a clip to a mono float32 waveform and its sampling rate; raise naming the file on failure."""
    import soundfile as sf

    if not isinstance(clip, Clip):
        clip = Clip(source=os.fspath(clip))
    source = io.BytesIO(clip.data) if clip.data is not None else clip.source
    try:
        waveform, rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, TypeError, OSError...
        raise AudioDecodeError(f"cannot decode audio {clip.source!r}: {error}") from error
    if waveform.shape[0] == 0:
        raise AudioDecodeError(f"audio {clip.source!r} has no samples")
    return waveform.mean(axis=1, dtype=np.float32), int(rate)


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Resample with a polyphase anti-aliasing filter (``scipy.signal.resample_poly``)."""
    from scipy.signal import resample_poly

    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_rate} -> {target_rate}")
    if orig_rate == target_rate:
        return np.asarray(waveform, dtype=np.float32)
    common = math.gcd(orig_rate, target_rate)
    return resample_poly(waveform, target_rate // common, orig_rate // common).astype(np.float32)


def normalize(waveform: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the clip, as ``Wav2Vec2FeatureExtractor(do_normalize=True)`` does."""
    waveform = np.asarray(waveform, dtype=np.float32)
    return (waveform - waveform.mean()) / np.sqrt(waveform.var() + 1e-7)


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
        raise ValueError(f"max_seconds must be > 0, got {max_seconds!r}")
    return round(max_seconds * sampling_rate)


# --- datasets ------------------------------------------------------------------------------------


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
        raise FileNotFoundError(f"FSDD folder {folder} does not exist")
    splits: dict[str, list[Clip]] = {"train": [], "test": []}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        match = FSDD_NAME.match(path.name)
        if match is None:
            raise ValueError(f"{path} is not named like an FSDD recording ({{digit}}_{{speaker}}_{{index}}.wav)")
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
        raise FileNotFoundError(f"dataset folder {root} does not exist")
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
            raise ValueError(
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
            raise ValueError(f"{metadata} has no 'file_name' column (columns: {columns})")
        text_column = next((c for c in TRANSCRIPT_COLUMNS if c in columns), None)
        if "label" not in columns and text_column is None:
            raise ValueError(
                f"{metadata} has neither a 'label' column nor a transcript column "
                f"(one of {list(TRANSCRIPT_COLUMNS)}); columns: {columns}"
            )
        clips = []
        for line, row in enumerate(reader, start=2):
            if not row["file_name"]:
                raise ValueError(f"{metadata}, line {line}: empty file_name")
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
            raise ValueError(f"{display_name}:{split} has no audio column {audio_column!r} ({dataset.column_names})")
        transcripts = text_column or next((c for c in TRANSCRIPT_COLUMNS if c in dataset.column_names), None)
        if text_column is not None and text_column not in dataset.column_names:
            raise ValueError(f"{display_name}:{split} has no column {text_column!r} ({dataset.column_names})")
        labels = label_column if label_column in dataset.column_names else None
        if labels is None and transcripts is None:
            raise ValueError(
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
    if path.exists() or not HUB_ID.fullmatch(str(dataset)):
        raise FileNotFoundError(f"dataset {str(dataset)!r} is neither a folder nor a hub id such as 'superb'")
    return hub_splits(str(dataset), config, **hub_kwargs)


def pick_eval_split(splits: Mapping[str, Sequence[Clip]], requested: str | None = None) -> str:
    """The requested eval split, or the first of validation/valid/dev/test the dataset has."""
    if requested is not None:
        if requested not in splits:
            raise ValueError(f"eval split {requested!r} not in the dataset's splits {sorted(splits)}")
        return requested
    for name in EVAL_SPLIT_PREFERENCE:
        if name in splits:
            return name
    raise ValueError(f"the dataset has no eval split (one of {list(EVAL_SPLIT_PREFERENCE)}); splits: {sorted(splits)}")


def subsample(clips: Sequence[Clip], limit: int | None, seed: int = 0) -> list[Clip]:
    """``limit`` clips drawn at random (fixed ``seed``), in their original order; all of them when None."""
    if limit is None or limit >= len(clips):
        return list(clips)
    if limit <= 0:
        raise ValueError(f"sample limit must be > 0, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(clips)), limit))
    return [clips[i] for i in chosen]


def _check_not_empty(splits: dict[str, list[Clip]], where: object) -> dict[str, list[Clip]]:
    empty = [name for name, clips in splits.items() if not clips]
    if not splits or empty:
        raise ValueError(f"dataset {where} has no audio clips in split(s) {empty or ['train']}")
    return splits


# --- labels and transcripts ----------------------------------------------------------------------


def label_names(clips: Iterable[Clip]) -> list[str]:
    """Sorted class names of the clips (every clip must have a label)."""
    names = set()
    for clip in clips:
        if clip.label is None or clip.label == "":
            raise ValueError(f"clip {clip.source!r} has no label (classification needs one per clip)")
        names.add(clip.label)
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def label_ids(clips: Sequence[Clip], label2id: Mapping[str, int]) -> list[int]:
    """Class ids of the clips; a label the model was not built for is an error naming the clip."""
    ids = []
    for clip in clips:
        if clip.label not in label2id:
            raise ValueError(
                f"unknown label {clip.label!r} of {clip.source!r}: the model's labels are {sorted(label2id)}"
            )
        ids.append(label2id[clip.label])
    return ids


def clean_transcript(text: str | None, source: str = "?") -> str:
    """A transcript with runs of whitespace collapsed to one space and the ends stripped."""
    if text is None or not text.strip():
        raise ValueError(f"clip {source!r} has no transcript (speech recognition needs one per clip)")
    return " ".join(text.split())


def build_vocabulary(transcripts: Iterable[str]) -> dict[str, int]:
    """Character vocabulary for CTC: ``<pad>`` (the CTC blank) = 0, ``<unk>`` = 1, then the characters.

    The space between words is the word delimiter ``|`` (always present, as Wav2Vec2CTCTokenizer expects).
    """
    characters = set()
    for text in transcripts:
        if WORD_DELIMITER in text:
            raise ValueError(f"transcript {text!r} contains the word delimiter {WORD_DELIMITER!r}")
        characters.update(text)
    if not characters:
        raise ValueError("no transcripts to build a vocabulary from")
    symbols = sorted({WORD_DELIMITER} | {c for c in characters if c != " "})
    return {PAD_TOKEN: 0, UNK_TOKEN: 1, **{symbol: i + 2 for i, symbol in enumerate(symbols)}}


def check_transcripts(clips: Sequence[Clip], vocabulary: Mapping[str, int]) -> list[str]:
    """Cleaned transcripts; a character missing from the vocabulary is an error naming it and the clip."""
    texts = []
    for clip in clips:
        text = clean_transcript(clip.transcript, clip.source)
        missing = sorted({c for c in text if (WORD_DELIMITER if c == " " else c) not in vocabulary})
        if missing:
            raise ValueError(
                f"transcript {text!r} of {clip.source!r} has characters {missing} missing from the vocabulary"
            )
        texts.append(text)
    return texts


def ctc_tokenizer(vocabulary: Mapping[str, int]):
    """A ``Wav2Vec2CTCTokenizer`` over ``vocabulary`` (no bos/eos, so its length is the vocabulary's)."""
    from transformers import Wav2Vec2CTCTokenizer

    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        vocab_file.write_text(json.dumps(dict(vocabulary), ensure_ascii=False), encoding="utf-8")
        return Wav2Vec2CTCTokenizer(
            str(vocab_file),
            unk_token=UNK_TOKEN,
            pad_token=PAD_TOKEN,
            word_delimiter_token=WORD_DELIMITER,
            bos_token=None,
            eos_token=None,
        )


# --- metrics -------------------------------------------------------------------------------------


def edit_distance(reference: Sequence, hypothesis: Sequence) -> int:
    """Levenshtein distance (substitutions + deletions + insertions), one row at a time."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, start=1):
        current = [i]
        for j, hyp_item in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_item != hyp_item)))
        previous = current
    return previous[-1]


def _error_rate(references: Sequence[str], hypotheses: Sequence[str], split) -> float:
    if isinstance(references, str) or isinstance(hypotheses, str):
        references, hypotheses = [references], [hypotheses]
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(split(r), split(h)) for r, h in zip(references, hypotheses, strict=True)]
    total = sum(len(r) for r, _ in pairs)
    if total == 0:
        raise ValueError("error rate is undefined: the references are empty")
    return sum(edit_distance(r, h) for r, h in pairs) / total


def word_error_rate(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Corpus WER: word edits summed over the corpus / reference words (jiwer's definition)."""
    return _error_rate(references, hypotheses, str.split)


def char_error_rate(references: Sequence[str] | str, hypotheses: Sequence[str] | str) -> float:
    """Corpus CER: character edits (spaces included) / reference characters, ends stripped (as jiwer)."""
    return _error_rate(references, hypotheses, lambda text: list(text.strip()))


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    if len(labels) != len(predictions) or not labels:
        raise ValueError(f"accuracy needs equal, non-empty sequences; got {len(labels)} and {len(predictions)}")
    return sum(int(a == b) for a, b in zip(labels, predictions, strict=True)) / len(labels)


# --- batches -------------------------------------------------------------------------------------


class SpeechDataset(torch.utils.data.Dataset):
    """Preprocessed clips in memory: ``{"input_values": float32 array, "labels": int or list[int]}``.

    Decoding everything up front means a bad file fails before training starts, not mid-epoch.
    """

    def __init__(self, waveforms: Sequence[np.ndarray], targets: Sequence[int | list[int]]):
        if len(waveforms) != len(targets):
            raise ValueError(f"{len(waveforms)} waveforms but {len(targets)} targets")
        if not waveforms:
            raise ValueError("empty speech dataset")
        self.waveforms = list(waveforms)
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.waveforms)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_values": self.waveforms[index], "labels": self.targets[index]}


@dataclass
class SpeechCollator:
    """Pads waveforms with ``padding_value`` (after per-clip normalisation) and builds the attention mask.

    Class labels become a ``LongTensor``; token-id labels are padded with -100, which CTC loss ignores.
    Models with ``feat_extract_norm="group"`` (wav2vec2-base) were trained without an attention mask:
    for them ``return_attention_mask`` is False and padding is zeros, as their feature extractor does.
    """

    return_attention_mask: bool = True
    padding_value: float = 0.0
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_values"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        values = torch.full((len(features), width), self.padding_value, dtype=torch.float32)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths, strict=True)):
            values[row, :length] = torch.as_tensor(feature["input_values"], dtype=torch.float32)
            mask[row, :length] = 1
        batch = {"input_values": values}
        if self.return_attention_mask:
            batch["attention_mask"] = mask
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], (list, tuple)):
            longest = max(len(tokens) for tokens in labels)
            padded = torch.full((len(labels), longest), -100, dtype=torch.long)
            for row, tokens in enumerate(labels):
                padded[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            batch["labels"] = padded
        else:
            batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
        return batch


# --- models --------------------------------------------------------------------------------------

# Small Wav2Vec2 configs that train on a CPU. Four conv layers with total stride 10*4*4*2 = 320
# (20 ms frames at 16 kHz, as wav2vec2-base; the first stride of 10 instead of 5 halves the cost of the
# conv stack, which dominates at these sizes), a short positional conv, and SpecAugment masks short
# enough for clips of a few dozen frames.
_SMALL_COMMON = {
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "conv_bias": True,
    "conv_kernel": (20, 8, 4, 4),
    "conv_stride": (10, 4, 4, 2),
    "num_conv_pos_embeddings": 16,
    "mask_time_length": 2,
    "layerdrop": 0.0,
    "ctc_loss_reduction": "mean",
    "ctc_zero_infinity": True,
}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        **_SMALL_COMMON,
        "conv_dim": (32, 32, 32, 32),
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "num_conv_pos_embedding_groups": 4,
        "classifier_proj_size": 32,
    },
    "small": {
        **_SMALL_COMMON,
        "conv_dim": (32, 32, 32, 32),
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 256,
        "num_conv_pos_embedding_groups": 4,
        "classifier_proj_size": 64,
    },
    "base": {},  # Wav2Vec2Config() defaults: the wav2vec2-base architecture
}


def parse_config_overrides(text: str | None) -> dict[str, Any]:
    """``"hidden_size=64,num_hidden_layers=2,conv_dim=[32,32]"`` -> a dict of JSON-parsed values.

    Values that are not JSON (``hidden_act=relu``) are kept as strings.
    """
    overrides: dict[str, Any] = {}
    if not text:
        return overrides
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"config override {item!r} is not 'key=value' (in {text!r})")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value.strip()
    return overrides


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so list values like ``conv_dim=[32,32]`` stay whole."""
    items, depth, current = [], 0, []
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item for item in items if item.strip()]


def scratch_config(size: str = "small", overrides: str | Mapping[str, Any] | None = None):
    """A ``Wav2Vec2Config`` of a named size (``tiny``, ``small``, ``base``) with ``overrides`` applied."""
    from transformers import Wav2Vec2Config

    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: expected one of {sorted(SIZES)}")
    values = dict(SIZES[size])
    values.update(parse_config_overrides(overrides) if isinstance(overrides, (str, type(None))) else overrides)
    config = Wav2Vec2Config(**values)
    unknown = sorted(k for k in values if not hasattr(config, k))
    if unknown:
        raise ValueError(f"unknown Wav2Vec2Config attribute(s) {unknown}")
    if len(config.conv_dim) != len(config.conv_kernel) or len(config.conv_dim) != len(config.conv_stride):
        raise ValueError(
            f"conv_dim, conv_kernel and conv_stride need the same length; got {len(config.conv_dim)}, "
            f"{len(config.conv_kernel)}, {len(config.conv_stride)}"
        )
    config.num_feat_extract_layers = len(config.conv_dim)
    return config


def scratch_feature_extractor(config, sampling_rate: int = SAMPLING_RATE):
    """The feature extractor that goes with a scratch config (attention mask iff layer-norm conv stack)."""
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=sampling_rate,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=config.feat_extract_norm == "layer",
    )


def build_model(
    task: str,
    *,
    model_name_or_path: str | None = None,
    init: str = "pretrained",
    config=None,
    labels: Sequence[str] | None = None,
    vocabulary: Mapping[str, int] | None = None,
):
    """A float32 classification or CTC model: from a checkpoint, its config with random weights
    (``init="scratch"``), or fresh from ``config``.

    classify: the head is sized for ``labels`` (a checkpoint whose trained head has other labels is an error).
    asr: the CTC head is sized for ``vocabulary``, whose ``<pad>`` is the CTC blank.
    """
    from transformers import AutoConfig, AutoModelForAudioClassification, AutoModelForCTC

    from hf_helu.training import load_model

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {list(TASKS)}")
    if (model_name_or_path is None) == (config is None):
        raise ValueError("pass exactly one of model_name_or_path (a checkpoint) and config (a new model)")
    head: dict[str, Any]
    if task == "classify":
        if not labels:
            raise ValueError("classification needs the label names")
        head = {
            "num_labels": len(labels),
            "label2id": {name: i for i, name in enumerate(labels)},
            "id2label": dict(enumerate(labels)),
        }
    else:
        if not vocabulary or PAD_TOKEN not in vocabulary:
            raise ValueError(f"speech recognition needs a vocabulary with {PAD_TOKEN!r} (the CTC blank)")
        head = {"vocab_size": len(vocabulary), "pad_token_id": vocabulary[PAD_TOKEN]}
    auto = AutoModelForAudioClassification if task == "classify" else AutoModelForCTC
    if config is None:
        _check_head_fits(task, AutoConfig.from_pretrained(model_name_or_path), head, model_name_or_path)
        return load_model(auto, model_name_or_path, init, **head)
    config = copy.deepcopy(config)
    for key, value in head.items():
        setattr(config, key, value)
    return auto.from_config(config, dtype=torch.float32)


def has_trained_head(config, task: str) -> bool:
    """Whether a checkpoint's config says it was saved with a classification (or CTC) head."""
    suffix = "ForSequenceClassification" if task == "classify" else "ForCTC"
    return any(name.endswith(suffix) for name in getattr(config, "architectures", None) or [])


def _check_head_fits(task: str, stored, head: Mapping[str, Any], where: str) -> None:
    """A checkpoint that already has a trained head must have been trained for these labels/characters."""
    if not has_trained_head(stored, task):
        return
    if task == "classify" and dict(stored.label2id) != dict(head["label2id"]):
        raise ValueError(f"{where} was trained for labels {sorted(stored.label2id)}, not {sorted(head['label2id'])}")
    if task == "asr" and stored.vocab_size != head["vocab_size"]:
        raise ValueError(f"{where} has a CTC head of {stored.vocab_size} tokens, not {head['vocab_size']}")
