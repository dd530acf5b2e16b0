"""The speech recipe (recipes/run_speech.py): clear errors on bad data, and tiny Wav2Vec2 runs on real FSDD clips
(classify and asr, eval-only, a pretrained checkpoint with its feature encoder frozen, LoRA, a CTC checkpoint's
tokenizer, 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import REPO, load_script
from recipe_support import speech
from speech_helpers import FSDD, needs_fsdd, write_audiofolder

RECIPE = REPO / "recipes" / "run_speech.py"
pytestmark = [needs_fsdd, pytest.mark.usefixtures("fresh_accelerate_state")]

TINY = ["--init", "scratch", "--model_size", "tiny", "--no_progress", "--dataset", str(FSDD)]


@pytest.fixture(scope="module")
def recipe():
    return load_script(RECIPE, "run_speech")


def run(recipe, tmp_path: Path, name: str, *argv: str) -> dict:
    output_dir = tmp_path / name
    results = recipe.main([*TINY, "--output_dir", str(output_dir), *argv])
    saved = "eval_results.json" if "--eval_only" in argv else "results.json"  # an eval-only run's own file
    assert json.loads((output_dir / saved).read_text())["final"] == results["final"]
    return results


# --- bad input -----------------------------------------------------------------------------------


def test_a_text_checkpoint_is_refused_before_any_loading(recipe, tmp_path, tiny_bert_dir):
    from hf_helu.errors import UsageError

    argv = [
        "--model_name_or_path",
        str(tiny_bert_dir),
        "--dataset",
        str(tmp_path / "no_data"),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(
        UsageError, match=rf"--model_name_or_path {tiny_bert_dir} is a 'bert' checkpoint; this recipe needs a speech"
    ):
        recipe.main(argv)
    assert not (tmp_path / "o").exists()


def test_a_wav_with_a_nan_sample_is_rejected_naming_the_file(recipe, tmp_path):
    from hf_helu.errors import UsageError

    data = tmp_path / "data"
    write_audiofolder(data, {"train/1": ["1_theo_5.wav", "1_theo_6.wav"], "train/2": ["2_theo_5.wav", "2_theo_6.wav"]})
    poisoned = data / "train" / "2" / "2_theo_6.wav"
    samples, rate = sf.read(poisoned, dtype="float32")
    samples[10] = np.nan
    sf.write(poisoned, samples, rate, subtype="FLOAT")
    with pytest.raises(UsageError, match=r"2_theo_6\.wav.* 1 non-finite sample\(s\)"):
        recipe.main([*TINY, "--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--eval_fraction", "0.5"])


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
    with pytest.raises(ValueError, match=r"lasts .* over the 0.2 s limit \(--max_seconds"):
        run(recipe, tmp_path, "cut", "--task", "asr", "--max_seconds", "0.2", "--max_train_samples", "4")


def write_tone(path: Path, seconds: float, rate: int = 8000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.sin(np.arange(round(seconds * rate)) * 0.3).astype(np.float32) * 0.1
    sf.write(path, samples, rate, subtype="PCM_16")
    return path


def test_clip_too_short_for_the_feature_encoder_is_rejected_before_training(recipe, tmp_path):
    data = tmp_path / "data"
    write_audiofolder(data, {"train/1": ["1_theo_5.wav"], "train/2": ["2_theo_5.wav"], "test/1": ["1_theo_0.wav"]})
    short = write_tone(data / "train" / "2" / "blip.wav", 0.005)  # 40 samples at 8 kHz, 80 after resampling
    from transformers import Wav2Vec2Model

    # The fewest samples that give one frame, found from the model's own length formula: 690 for the tiny stack.
    lengths = Wav2Vec2Model(speech.scratch_config("tiny"))._get_feat_extract_output_lengths(torch.arange(1, 2000))
    needed = int((lengths >= 1).nonzero()[0]) + 1
    pattern = rf"clip '{short}' has 80 samples at 16000 Hz .* needs at least {needed} samples"
    with pytest.raises(ValueError, match=pattern):
        recipe.main([*TINY, "--dataset", str(data), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "results.json").exists()  # nothing trained, nothing written


def test_dataset_with_one_class_is_rejected(recipe, tmp_path):
    data = tmp_path / "data"
    write_audiofolder(data, {"train/4": ["4_theo_5.wav", "4_theo_6.wav"], "test/4": ["4_theo_0.wav"]})
    with pytest.raises(ValueError, match=r"has 1 class\(es\) \['4'\] .*needs at least 2"):
        recipe.main([*TINY, "--dataset", str(data), "--output_dir", str(tmp_path / "out")])


def test_undecodable_clip_is_a_one_line_error_with_exit_status_2(tmp_path):
    data = tmp_path / "data"
    write_audiofolder(data, {"train/1": ["1_theo_5.wav"], "train/2": ["2_theo_5.wav"], "test/1": ["1_theo_0.wav"]})
    broken = data / "test" / "1" / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    command = [sys.executable, str(RECIPE), *TINY, "--dataset", str(data), "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot decode audio '{broken}'") and "Traceback" not in done.stderr


def test_plain_audio_folder_gets_a_reproducible_stratified_split(recipe, tmp_path):
    data = tmp_path / "data"
    write_audiofolder(data, {str(d): [f"{d}_jackson_{i}.wav" for i in range(5)] for d in (3, 8)})
    argv = [*TINY, "--dataset", str(data), "--eval_fraction", "0.4", "--split_seed", "7", "--max_train_steps", "1"]
    results = recipe.main([*argv, "--output_dir", str(tmp_path / "out")])
    held_out = results["config"]["data"]["held_out_split"]
    assert held_out == {
        "from": "train", "eval_fraction": 0.4, "split_seed": 7, "stratified_by": "label",
        "train_clips": 6, "eval_clips": 4,
    }  # fmt: skip
    assert results["config"]["data"]["eval_split"] == speech.HELD_OUT_SPLIT
    assert results["final"][speech.HELD_OUT_SPLIT]["num_samples"] == 4  # 2 of each digit's 5 clips
    clips = speech.audiofolder_splits(data)["train"]
    assert results["config"]["data"]["train_clips"] == len(speech.stratified_split(clips, 0.4, 7)[0]) == 6


# --- training runs -------------------------------------------------------------------------------

TRAIN = [
    "--max_train_samples",
    "96",
    "--max_eval_samples",
    "96",
    "--eval_split",
    "train",
    "--per_device_train_batch_size",
    "8",
]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", "asr"])
def test_one_epoch_lowers_the_loss_and_eval_only_reproduces_it(recipe, tmp_path, task):
    # Eval split = the 96 training clips, so the before/after losses are over the same clips the epoch saw.
    before = run(recipe, tmp_path, "before", "--task", task, *TRAIN, "--eval_only")["final"]["train"]
    trained = run(
        recipe, tmp_path, "train", "--task", task, *TRAIN, "--num_train_epochs", "1", "--learning_rate", "2e-3"
    )
    after = trained["final"]["train"]
    assert after["num_samples"] == before["num_samples"] == 96
    assert after["loss"] < before["loss"]
    assert trained["status"] == "complete" and trained["num_processes"] == 1
    saved = tmp_path / "train" / "model"
    evaluate = [
        "--task",
        task,
        "--eval_only",
        "--model_name_or_path",
        str(saved),
        "--output_dir",
        str(tmp_path / "again"),
    ]
    again = recipe.main([*TINY[4:], *evaluate, *TRAIN[:6]])
    assert again["final"]["train"] == pytest.approx(after, rel=1e-5)


SMALL = ["--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_train_batch_size", "8"]


@pytest.mark.slow
def test_pretrained_classification_checkpoint_is_loaded_and_its_feature_encoder_frozen(recipe, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    checkpoint = tmp_path / "pretrained"
    torch.manual_seed(0)
    encoder = Wav2Vec2Model(speech.scratch_config("tiny"))
    encoder.save_pretrained(checkpoint)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(checkpoint)

    sizes = [*SMALL, "--num_train_epochs", "1"]
    results = recipe.main(
        [*TINY[4:], "--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "out"), *sizes]
    )
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
    sizes = [*SMALL, "--max_train_steps", "1", "--warmup_ratio", "0"]
    argv = [
        *TINY[4:],
        "--model_name_or_path",
        str(checkpoint),
        "--lora",
        "--lora_r",
        "4",
        "--activation",
        "helu",
        *sizes,
    ]
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

    common = [*TINY[4:], "--task", "asr", "--model_name_or_path", str(checkpoint), "--max_train_samples", "8"]
    results = recipe.main(
        [*common, "--max_eval_samples", "8", "--max_train_steps", "1", "--output_dir", str(tmp_path / "a")]
    )
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
    command += [str(RECIPE), *TINY, "--output_dir", str(output_dir), "--num_train_epochs", "1"]
    command += ["--max_train_samples", "32", "--max_eval_samples", "21", "--per_device_train_batch_size", "4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((output_dir / "results.json").read_text())
    assert results["num_processes"] == 2
    assert results["final"]["test"]["num_samples"] == 21
    assert results["train_samples"] == 32
    evaluate = [
        "--eval_only",
        "--model_name_or_path",
        str(output_dir / "model"),
        "--output_dir",
        str(tmp_path / "again"),
    ]
    again = load_script(RECIPE, "run_speech_again").main([*TINY[4:], *evaluate, "--max_eval_samples", "21"])
    assert again["final"]["test"] == pytest.approx(results["final"]["test"], rel=1e-4)
