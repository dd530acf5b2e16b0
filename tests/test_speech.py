"""The speech recipe: audio data, features, metrics, and tiny Wav2Vec2 runs on real FSDD clips."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch

from hf_helu import speech

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HF_HELU_DATA_DIR") or REPO.parent / "shared" / "data")
FSDD = DATA / "fsdd"
RECORDINGS = FSDD / "recordings"

pytestmark = pytest.mark.skipif(not RECORDINGS.is_dir(), reason=f"FSDD not found at {RECORDINGS}")

TINY = ["--init", "scratch", "--model_size", "tiny", "--no_progress", "--dataset", str(FSDD)]


def load_recipe():
    spec = importlib.util.spec_from_file_location("speech_recipe", REPO / "recipes" / "speech.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


def run(recipe, tmp_path: Path, name: str, *argv: str) -> dict:
    output_dir = tmp_path / name
    results = recipe.main([*TINY, "--output_dir", str(output_dir), *argv])
    assert json.loads((output_dir / "results.json").read_text())["final"] == results["final"]
    return results


def fsdd_files(names: list[str]) -> list[Path]:
    return [RECORDINGS / name for name in names]


# --- data ----------------------------------------------------------------------------------------


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
    assert speech.label_names(splits["train"]) == [str(d) for d in range(10)]


def test_resampling_8k_to_16k_keeps_a_tone():
    seconds, freq = 0.5, 440.0
    t8 = np.arange(int(8000 * seconds)) / 8000
    up = speech.resample(np.sin(2 * np.pi * freq * t8).astype(np.float32), 8000, 16000)
    t16 = np.arange(len(up)) / 16000
    assert len(up) == 2 * len(t8)
    middle = slice(400, -400)  # away from the filter's edge effects
    np.testing.assert_allclose(up[middle], np.sin(2 * np.pi * freq * t16)[middle], atol=2e-3)


def test_normalisation_padding_and_mask_match_wav2vec2_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    clips = [speech.Clip(str(p)) for p in fsdd_files(["3_theo_7.wav", "0_george_0.wav", "9_lucas_20.wav"])]
    raw = [speech.resample(*speech.read_audio(c)) for c in clips]
    assert len({len(w) for w in raw}) == 3
    extractor = Wav2Vec2FeatureExtractor(return_attention_mask=True, do_normalize=True)
    expected = extractor(raw, sampling_rate=16000, padding=True, return_tensors="pt")
    batch = speech.SpeechCollator(return_attention_mask=True)(
        [{"input_values": speech.load_waveform(c), "labels": 0} for c in clips]
    )
    torch.testing.assert_close(batch["input_values"], expected["input_values"], atol=1e-5, rtol=1e-5)
    assert torch.equal(batch["attention_mask"], expected["attention_mask"].long())
    no_mask = speech.SpeechCollator(return_attention_mask=False)([{"input_values": np.ones(3), "labels": 1}])
    assert set(no_mask) == {"input_values", "labels"}


def test_length_cap_truncates_before_normalising():
    clip = speech.Clip(str(RECORDINGS / "0_george_0.wav"))
    full = speech.load_waveform(clip, do_normalize=False)
    capped = speech.load_waveform(clip, max_seconds=0.1)
    assert len(capped) == 1600 < len(full)
    np.testing.assert_allclose(capped, (full[:1600] - full[:1600].mean()) / np.sqrt(full[:1600].var() + 1e-7))


def test_token_labels_pad_with_minus_100():
    batch = speech.SpeechCollator()(
        [{"input_values": np.zeros(5), "labels": [3, 4]}, {"input_values": np.zeros(2), "labels": [5, 6, 7]}]
    )
    assert batch["labels"].tolist() == [[3, 4, -100], [5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def write_audiofolder(root: Path, layout: dict[str, list[str]]) -> None:
    """``{"train/3": [fsdd names]}``: copies real FSDD recordings into label folders."""
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(RECORDINGS / name, root / folder / name)


def test_audiofolder_with_label_subfolders(tmp_path):
    write_audiofolder(tmp_path, {"yes": ["1_theo_5.wav", "1_theo_6.wav"], "no": ["0_theo_5.wav"]})
    splits = speech.load_splits(tmp_path)
    assert list(splits) == ["train"]
    assert sorted((Path(c.source).name, c.label) for c in splits["train"]) == [
        ("0_theo_5.wav", "no"),
        ("1_theo_5.wav", "yes"),
        ("1_theo_6.wav", "yes"),
    ]
    assert speech.label_names(splits["train"]) == ["no", "yes"]


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
    assert speech.read_audio(clip)[1] == 8000


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
        decoded, rate = speech.read_audio(clip)
        expected, expected_rate = sf.read(path, dtype="float32")
        assert rate == expected_rate == 8000
        np.testing.assert_array_equal(decoded, expected)


# --- vocabulary, tokenizer, metrics --------------------------------------------------------------


def test_vocabulary_and_ctc_tokenizer_round_trip():
    texts = ["seven", "nine", "one two", "it's ok"]
    vocabulary = speech.build_vocabulary(texts)
    assert vocabulary["<pad>"] == 0 and vocabulary["<unk>"] == 1 and "|" in vocabulary
    assert set(vocabulary) - {"<pad>", "<unk>", "|"} == set("".join(texts)) - {" "}
    tokenizer = speech.ctc_tokenizer(vocabulary)
    assert len(tokenizer) == len(vocabulary)
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids == [vocabulary["|" if c == " " else c] for c in text]
        assert tokenizer.decode(ids, group_tokens=False, clean_up_tokenization_spaces=False) == text
    # CTC decoding collapses repeats and drops the blank between them.
    s, e, v, n = (vocabulary[c] for c in "sevn")
    assert tokenizer.decode([0, s, s, e, 0, v, e, e, 0, n, 0]) == "seven"


REFERENCES = ["the cat sat on the mat", "seven", "one two three", "hello world", "a b c d"]
HYPOTHESES = ["the cat sit on mat", "seven", "one too three four", "", "a  b x d e"]


def test_wer_and_cer_match_jiwer():
    assert math.isclose(speech.word_error_rate(REFERENCES, HYPOTHESES), jiwer.wer(REFERENCES, HYPOTHESES))
    assert math.isclose(speech.char_error_rate(REFERENCES, HYPOTHESES), jiwer.cer(REFERENCES, HYPOTHESES))
    for ref, hyp in zip(REFERENCES, HYPOTHESES, strict=True):
        assert math.isclose(speech.word_error_rate(ref, hyp), jiwer.wer(ref, hyp))
        assert math.isclose(speech.char_error_rate(ref, hyp), jiwer.cer(ref, hyp))
    assert speech.word_error_rate("one two three", "two three") == 1 / 3
    assert speech.edit_distance("kitten", "sitting") == 3
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        speech.word_error_rate(["a", "b"], ["a"])


# --- bad input -----------------------------------------------------------------------------------


def test_unreadable_audio_names_the_file(tmp_path):
    bad = tmp_path / "label" / "broken.wav"
    bad.parent.mkdir()
    bad.write_bytes(b"RIFF not really a wave file")
    (clip,) = speech.load_splits(tmp_path)["train"]
    with pytest.raises(speech.AudioDecodeError, match=r"broken\.wav"):
        speech.load_waveform(clip)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "train" / "label").mkdir(parents=True)
    with pytest.raises(ValueError, match="no audio clips"):
        speech.load_splits(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub id"):
        speech.load_splits(tmp_path / "missing" / "folder")


def test_unknown_eval_label_is_an_error(recipe, tmp_path):
    data = tmp_path / "data"
    write_audiofolder(data, {"train/1": ["1_theo_5.wav"], "train/2": ["2_theo_5.wav"], "test/3": ["3_theo_0.wav"]})
    with pytest.raises(ValueError, match=r"unknown label '3' of .*3_theo_0\.wav.*\['1', '2'\]"):
        recipe.main([*TINY, "--dataset", str(data), "--output_dir", str(tmp_path / "out")])


def test_transcript_characters_missing_from_vocabulary(recipe, tmp_path):
    data = tmp_path / "data"
    write_audiofolder(data, {"train": ["1_theo_5.wav"], "test": ["1_theo_0.wav"]})
    for split, name, text in (("train", "1_theo_5.wav", "one"), ("test", "1_theo_0.wav", "one!")):
        (data / split / "metadata.csv").write_text(f"file_name,transcript\n{name},{text}\n")
    with pytest.raises(ValueError, match=r"transcript 'one!' of .*1_theo_0\.wav' has characters \['!'\] missing"):
        recipe.main([*TINY, "--task", "asr", "--dataset", str(data), "--output_dir", str(tmp_path / "out")])


def test_asr_refuses_to_cut_a_clip(recipe, tmp_path):
    with pytest.raises(ValueError, match=r"lasts .* over --max_seconds 0.2"):
        run(recipe, tmp_path, "cut", "--task", "asr", "--max_seconds", "0.2", "--max_train_samples", "4")


# --- training runs -------------------------------------------------------------------------------

TRAIN = ["--max_train_samples", "96", "--max_eval_samples", "96", "--eval_split", "train", "--batch_size", "8"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", "asr"])
def test_one_epoch_lowers_the_loss_and_eval_only_reproduces_it(recipe, tmp_path, task):
    # Eval split = the 96 training clips, so the before/after losses are over the same clips the epoch saw.
    before = run(recipe, tmp_path, "before", "--task", task, *TRAIN, "--eval_only")["final"]["train"]
    trained = run(recipe, tmp_path, "train", "--task", task, *TRAIN, "--epochs", "1", "--lr", "2e-3")
    after = trained["final"]["train"]
    assert after["num_samples"] == before["num_samples"] == 96
    assert after["loss"] < before["loss"]
    assert trained["status"] == "complete" and trained["num_processes"] == 1
    saved = tmp_path / "train" / "model"
    evaluate = ["--task", task, "--eval_only", "--model", str(saved), "--output_dir", str(tmp_path / "again")]
    again = recipe.main([*TINY[4:], *evaluate, *TRAIN[:6]])
    assert again["final"]["train"] == pytest.approx(after, rel=1e-5)


@pytest.mark.slow
def test_pretrained_classification_checkpoint_is_loaded_and_its_feature_encoder_frozen(recipe, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    checkpoint = tmp_path / "pretrained"
    torch.manual_seed(0)
    encoder = Wav2Vec2Model(speech.scratch_config("tiny"))
    encoder.save_pretrained(checkpoint)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(checkpoint)

    sizes = ["--max_train_samples", "16", "--max_eval_samples", "8", "--batch_size", "8", "--epochs", "1"]
    results = recipe.main([*TINY[4:], "--model", str(checkpoint), "--output_dir", str(tmp_path / "out"), *sizes])
    assert results["config"]["freeze_feature_encoder"] is True
    from transformers import AutoModelForAudioClassification

    trained = AutoModelForAudioClassification.from_pretrained(tmp_path / "out" / "model")
    assert trained.config.id2label == {i: str(i) for i in range(10)}
    for name, value in encoder.state_dict().items():
        after = trained.wav2vec2.state_dict()[name]
        if name.startswith("feature_extractor."):
            assert torch.equal(after, value), name  # loaded from the checkpoint, then frozen
    layer = "encoder.layers.0.feed_forward.intermediate_dense.weight"
    before, after = encoder.state_dict()[layer], trained.wav2vec2.state_dict()[layer]
    assert not torch.equal(after, before) and (after - before).abs().max() < 0.05  # fine-tuned from it


@pytest.mark.slow
def test_lora_trains_adapters_and_the_new_head(recipe, tmp_path):
    from transformers import AutoModelForAudioClassification, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    checkpoint = tmp_path / "pretrained"
    config = speech.scratch_config("tiny")
    encoder = Wav2Vec2Model(config)
    encoder.save_pretrained(checkpoint)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(checkpoint)
    sizes = [
        "--max_train_samples",
        "16",
        "--max_eval_samples",
        "8",
        "--batch_size",
        "8",
        "--max_steps",
        "1",
        "--warmup_ratio",
        "0",
    ]
    argv = [*TINY[4:], "--model", str(checkpoint), "--lora", "--lora_r", "4", "--activation", "helu", *sizes]
    results = recipe.main([*argv, "--output_dir", str(tmp_path / "out")])
    hidden, layers, labels = config.hidden_size, config.num_hidden_layers, 10
    lora = layers * 2 * (4 * hidden + hidden * 4)  # q_proj and v_proj: A (r x in) and B (out x r)
    head = (hidden * config.classifier_proj_size + config.classifier_proj_size) + (
        config.classifier_proj_size * labels + labels
    )
    assert results["model"]["lora"]["trainable_params"] == lora + head
    merged = AutoModelForAudioClassification.from_pretrained(tmp_path / "out" / "model")
    assert merged.config.hidden_act == "helu"
    name = "encoder.layers.0.attention.q_proj.weight"
    assert not torch.equal(merged.wav2vec2.state_dict()[name], encoder.state_dict()[name])  # LoRA merged in
    name = "encoder.layers.0.attention.k_proj.weight"
    assert torch.equal(merged.wav2vec2.state_dict()[name], encoder.state_dict()[name])  # not a LoRA target


@pytest.mark.slow
def test_pretrained_ctc_checkpoint_keeps_its_tokenizer(recipe, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor

    vocabulary = speech.build_vocabulary(["zero one two three four five six seven eight nine", "quack"])
    tokenizer = speech.ctc_tokenizer(vocabulary)
    checkpoint = tmp_path / "pretrained"
    config = speech.scratch_config("tiny")
    config.vocab_size, config.pad_token_id = len(vocabulary), 0
    Wav2Vec2ForCTC(config).save_pretrained(checkpoint)
    Wav2Vec2Processor(Wav2Vec2FeatureExtractor(return_attention_mask=True), tokenizer).save_pretrained(checkpoint)

    common = [*TINY[4:], "--task", "asr", "--model", str(checkpoint), "--max_train_samples", "8"]
    results = recipe.main([*common, "--max_eval_samples", "8", "--max_steps", "1", "--output_dir", str(tmp_path / "a")])
    assert results["config"]["data"]["vocabulary_size"] == len(vocabulary)  # 'q', 'a', 'c', 'k' kept, not rebuilt
    assert json.loads((tmp_path / "a" / "model" / "vocab.json").read_text()) == vocabulary

    no_z = {token: i for i, token in enumerate(t for t in vocabulary if t != "z")}
    speech.ctc_tokenizer(no_z).save_pretrained(checkpoint)
    with pytest.raises(ValueError, match=r"transcript 'zero' of .*0_\w+_\d+\.wav' has characters \['z'\] missing"):
        recipe.main([*common, "--output_dir", str(tmp_path / "b")])


@pytest.mark.slow
def test_two_processes(tmp_path):
    """torchrun with 2 CPU processes trains; its eval metrics see each clip once (as 1 process re-evaluating)."""
    output_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(REPO / "recipes" / "speech.py"), *TINY, "--output_dir", str(output_dir), "--epochs", "1"]
    command += ["--max_train_samples", "32", "--max_eval_samples", "21", "--batch_size", "4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["num_processes"] == 2
    assert results["final"]["test"]["num_samples"] == 21
    assert results["train_samples"] == 32
    evaluate = ["--eval_only", "--model", str(output_dir / "model"), "--output_dir", str(tmp_path / "again")]
    again = load_recipe().main([*TINY[4:], *evaluate, "--max_eval_samples", "21"])
    assert again["final"]["test"] == pytest.approx(results["final"]["test"], rel=1e-4)
