"""Speech datasets (recipe_support.speech.audio): FSDD, audiofolders (label folders, splits, metadata.csv), hub-style
datasets decoded by soundfile, the class labels a classification head gets, and clear errors."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from recipe_support import speech
from speech_helpers import FSDD, fsdd_files, needs_fsdd, write_audiofolder

from hf_helu.errors import UsageError

pytestmark = needs_fsdd


def class_labels(clips: list) -> list[str]:
    """The labels a scratch classification model gets for ``clips`` as its train split."""
    from transformers import Wav2Vec2FeatureExtractor

    args = argparse.Namespace(model_name_or_path=None, dataset="data", train_split="train")
    return speech.classify_setup(args, None, clips, Wav2Vec2FeatureExtractor(), max_seconds=1.0).head["labels"]


def test_fsdd_split_labels_and_transcripts():
    splits = speech.load_splits(FSDD)
    assert {name: len(clips) for name, clips in splits.items()} == {"train": 2700, "test": 300}
    for split, clips in splits.items():
        for clip in clips:
            digit, _speaker, index = Path(clip.source).stem.split("_")
            assert (int(index) < 5) == (split == "test")
            assert clip.label == digit
            assert (
                clip.transcript
                == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"][int(digit)]
            )
    assert class_labels(splits["train"]) == [str(d) for d in range(10)]


def test_audiofolder_with_label_subfolders(tmp_path):
    write_audiofolder(tmp_path, {"yes": ["1_theo_5.wav", "1_theo_6.wav"], "no": ["0_theo_5.wav"]})
    splits = speech.load_splits(tmp_path)
    assert list(splits) == ["train"]
    assert sorted((Path(c.source).name, c.label) for c in splits["train"]) == [
        ("0_theo_5.wav", "no"),
        ("1_theo_5.wav", "yes"),
        ("1_theo_6.wav", "yes"),
    ]
    assert class_labels(splits["train"]) == ["no", "yes"]


def test_class_labels_sort_numbers_numerically_and_every_clip_needs_one():
    clips = [speech.Clip(f"{label}.wav", label=label) for label in ("10", "b", "9", "a", "10")]
    assert class_labels(clips) == ["9", "10", "a", "b"]
    with pytest.raises(UsageError, match=r"clip 'x\.wav' has no label"):
        class_labels([*clips, speech.Clip("x.wav")])
    with pytest.raises(UsageError, match=r"has 1 class\(es\) \['a'\] in split 'train'"):
        class_labels(clips[3:4])


def test_audiofolder_with_splits_and_metadata(tmp_path):
    write_audiofolder(tmp_path, {"train/clips": ["2_jackson_5.wav"], "test": ["2_jackson_0.wav"]})
    for split, file_name in (("train", "clips/2_jackson_5.wav"), ("test", "2_jackson_0.wav")):
        with (tmp_path / split / "metadata.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([["file_name", "label", "transcript"], [file_name, "two", "two  "]])
    splits = speech.load_splits(tmp_path)
    assert sorted(splits) == ["test", "train"]
    assert speech.pick_eval_split(splits) == "test"
    clip = splits["train"][0]
    assert (clip.source, clip.label, clip.transcript) == (str(tmp_path / "train/clips/2_jackson_5.wav"), "two", "two  ")
    assert len(speech.load_waveform(clip, 8000)) == sf.info(clip.source).frames  # read at its own 8 kHz


def test_hub_style_dataset_is_decoded_by_soundfile_not_torchcodec():
    from datasets import Audio, ClassLabel, Dataset, DatasetDict

    paths = fsdd_files(["4_nicolas_9.wav", "7_yweweler_3.wav"])
    as_bytes = [{"bytes": p.read_bytes(), "path": None} for p in paths]  # as parquet-backed hub datasets store audio
    dataset = Dataset.from_dict({"audio": as_bytes, "label": [0, 1], "text": ["four", "seven"]})
    dataset = dataset.cast_column("audio", Audio()).cast_column("label", ClassLabel(names=["four", "seven"]))
    unlabelled = Dataset.from_dict({"audio": [str(paths[0])], "label": [-1], "text": ["four"]})
    unlabelled = unlabelled.cast_column("audio", Audio()).cast_column("label", dataset.features["label"])
    splits = speech.clips_from_datasets(DatasetDict(train=dataset, test=unlabelled), "local/fake")
    assert [(c.source, c.label) for c in splits["test"]] == [(str(paths[0]), None)]  # a local file, read from disk
    clips = splits["train"]
    assert [(c.label, c.transcript, c.source) for c in clips] == [
        ("four", "four", "local/fake:train[0]"),
        ("seven", "seven", "local/fake:train[1]"),
    ]
    for clip, path in zip(clips, paths, strict=True):
        expected, rate = sf.read(path, dtype="float32")
        assert rate == 8000
        np.testing.assert_array_equal(speech.load_waveform(clip, 8000), expected)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "train" / "label").mkdir(parents=True)
    with pytest.raises(ValueError, match="no audio clips"):
        speech.load_splits(tmp_path)
    with pytest.raises(UsageError, match="neither a folder nor a hub id"):
        speech.load_splits(tmp_path / "missing" / "folder")


def test_subset_in_order_is_fixed_by_its_seed_and_keeps_the_order():
    clips = [speech.Clip(f"clip{i}.wav") for i in range(30)]
    chosen = speech.subset_in_order(clips, 8, seed=1)
    assert chosen == speech.subset_in_order(clips, 8, seed=1) and len(set(chosen)) == 8
    assert [clips.index(c) for c in chosen] == sorted(clips.index(c) for c in chosen)  # original order
    assert chosen != clips[:8]  # drawn at random, not the first ones
    assert speech.subset_in_order(clips, None) == clips == speech.subset_in_order(clips, 30)


def test_stratified_split_is_reproducible_per_class_and_recorded():
    clips = [speech.Clip(f"{label}_{i}.wav", label=label) for label in "abc" for i in range(10 if label != "c" else 3)]
    train, held, description = speech.stratified_split(clips, 0.3, seed=5)
    again = speech.stratified_split(clips, 0.3, seed=5)
    assert (train, held) == again[:2]
    assert speech.stratified_split(clips, 0.3, seed=6)[1] != held
    assert sorted(c.source for c in train + held) == sorted(c.source for c in clips)
    per_class = {label: sum(c.label == label for c in held) for label in "abc"}
    assert per_class == {"a": 3, "b": 3, "c": 1}  # ceil(0.3 * 23) = 7 clips shared in proportion to 10:10:3
    assert description == {
        "from": "train", "eval_fraction": 0.3, "split_seed": 5, "stratified_by": "label",
        "train_clips": 16, "eval_clips": 7,
    }  # fmt: skip
    assert held == [c for c in clips if c in held]  # original order kept


def test_stratified_split_refuses_a_class_of_one_clip_or_too_few_clips():
    clips = [speech.Clip("a_0.wav", label="a"), speech.Clip("a_1.wav", label="a"), speech.Clip("b_0.wav", label="b")]
    with pytest.raises(UsageError, match=r"--eval_fraction 0.5 of 3 clips \(\{'a': 2, 'b': 1\} per class\): .*only 1"):
        speech.stratified_split(clips, 0.5)
    clips = [speech.Clip(f"{label}_{i}.wav", label=label) for label in "abc" for i in range(4)]
    with pytest.raises(UsageError, match=r"--eval_fraction 0.1 of 12 clips .*number of classes = 3"):
        speech.stratified_split(clips, 0.1)
