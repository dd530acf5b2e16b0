"""The speech recipe on Whisper (picked from the checkpoint's config): a tiny random Whisper with the real tiny.en
tokenizer fine-tuned for asr with HeLU, ``--conversion auto`` (calibrate+anneal) and distillation, its stock-ReLU
export generating exactly what the HeLU model generates; and Whisper audio classification."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, WHISPER_DIR, load_script
from recipe_support import speech
from speech_helpers import FSDD, RECORDINGS, needs_fsdd, write_tiny_whisper

pytestmark = [
    needs_fsdd,
    pytest.mark.skipif(not (WHISPER_DIR / "tokenizer.json").is_file(), reason=f"no Whisper at {WHISPER_DIR}"),
    pytest.mark.usefixtures("fresh_accelerate_state"),
]
SIZES = [
    "--max_train_samples",
    "4",
    "--max_eval_samples",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--num_train_epochs",
    "1",
]


@pytest.fixture(scope="module")
def recipe():
    return load_script(REPO / "recipes" / "run_speech.py", "run_speech_whisper")


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    return write_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny", WHISPER_DIR)


def common(model, tmp_path):
    return ["--model_name_or_path", str(model), "--dataset", str(FSDD), "--encoder_seconds", "3", "--no_progress"]


def test_whisper_asr_with_helu_auto_conversion_and_distillation_exports_stock_relu(recipe, tiny_whisper, tmp_path):
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    out = tmp_path / "asr"
    argv = [*common(tiny_whisper, tmp_path), "--task", "asr", "--activation", "helu", "--distill_weight", "0.5"]
    argv += [*SIZES, "--generation_max_tokens", "4", "--calibration_samples", "4", "--output_dir", str(out)]
    results = recipe.main(argv)
    choice, converted = results["model"]["conversion_choice"], results["model"]["conversion"]
    assert (choice["requested"], choice["method"]) == ("auto", "calibrate+anneal")
    layers = [layer["activation"] for layer in converted["calibration"]["layers"]]
    assert layers == ["model.encoder.layers.0.activation_fn", "model.decoder.layers.0.activation_fn"]
    final = results["final"]["test"]
    assert final["num_samples"] == 2 and {"wer", "cer", "exact_match", "loss"} <= set(final)
    assert {layer["name"] for layer in results["dead_units"]["layers"]} == set(layers)
    assert results["config"]["data"]["encoder_seconds"] == 3.0

    relu_dir = out / "model_relu"
    config = json.loads((relu_dir / "config.json").read_text())
    assert (config["activation_function"], config["max_source_positions"]) == ("relu", 150)
    assert WhisperFeatureExtractor.from_pretrained(relu_dir).nb_max_frames == 300
    helu_model = WhisperForConditionalGeneration.from_pretrained(out / "model").eval()
    relu_model = WhisperForConditionalGeneration.from_pretrained(relu_dir).eval()
    assert helu_model.config.activation_function.startswith("helu")
    waveforms = [
        speech.load_waveform(speech.Clip(str(RECORDINGS / name))) for name in ("3_theo_0.wav", "6_lucas_1.wav")
    ]
    features = WhisperFeatureExtractor.from_pretrained(relu_dir)(waveforms, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        want = helu_model.generate(features.input_features, max_new_tokens=6)
        got = relu_model.generate(features.input_features, max_new_tokens=6)
    assert torch.equal(got, want)


def test_whisper_audio_classification(recipe, tiny_whisper, tmp_path):
    from transformers import WhisperForAudioClassification

    out = tmp_path / "classify"
    results = recipe.main([*common(tiny_whisper, tmp_path), "--task", "classify", *SIZES, "--output_dir", str(out)])
    assert results["model"]["conversion_choice"]["method"] == "none"  # activation kept
    assert results["final"]["test"]["num_samples"] == 2 and 0 <= results["final"]["test"]["accuracy"] <= 1
    model = WhisperForAudioClassification.from_pretrained(out / "model")
    assert model.config.id2label == {i: str(i) for i in range(10)}
    assert model.config.max_source_positions == 150
