"""Whisper tiny.en (the real checkpoint in ../shared/data): HeLU patched into its encoder and decoder FFNs,
calibrated on a few FSDD clips (encoder FFNs on log-mel features, decoder FFNs on teacher-forced transcripts),
exported to stock ReLU, and transcribed by the stock ``pipeline`` in a process that never imports hf_helu."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import WHISPER_DIR
from recipe_support import speech
from speech_helpers import RECORDINGS, needs_fsdd

from hf_helu import conversion
from hf_helu.patching import export_for_inference

pytestmark = [
    needs_fsdd,
    pytest.mark.skipif(not (WHISPER_DIR / "model.safetensors").is_file(), reason=f"no Whisper at {WHISPER_DIR}"),
]

FFN_ACTIVATIONS = [f"model.{part}.layers.{i}.activation_fn" for part in ("encoder", "decoder") for i in range(4)]

STOCK_PIPELINE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.modules["hf_helu"] = None  # importing hf_helu here would fail: the export must not need it
    from transformers import pipeline
    folder, waveforms = sys.argv[1], np.load(sys.argv[2])
    asr = pipeline("automatic-speech-recognition", model=folder, device="cpu")
    print(json.dumps([asr(w, generate_kwargs={"max_new_tokens": 8})["text"] for w in waveforms]))
    """
)


def test_calibrated_helu_whisper_deploys_as_stock_relu(tmp_path):
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer, pipeline

    model = speech.build_model("asr", model_name_or_path=str(WHISPER_DIR)).eval()
    assert speech.shorten_encoder(model, 1) == 50
    feature_extractor = WhisperFeatureExtractor.from_pretrained(WHISPER_DIR, chunk_length=1)
    tokenizer = WhisperTokenizer.from_pretrained(WHISPER_DIR)
    originals = conversion.original_activations(model)
    report = conversion.patch_activation(model, "helu")
    assert sorted(c.name for c in report.changed) == sorted(
        FFN_ACTIVATIONS
    )  # every encoder and decoder FFN, nothing else

    calibration_clips = [
        speech.Clip(str(RECORDINGS / f"{d}_theo_7.wav"), transcript=speech.DIGIT_WORDS[d]) for d in (1, 7)
    ]
    targets = tokenizer([clip.transcript for clip in calibration_clips]).input_ids
    dataset = [
        {"input_values": speech.load_waveform(c), "labels": t} for c, t in zip(calibration_clips, targets, strict=True)
    ]
    collator = speech.SpeechCollator(feature_extractor, decoder_pad_id=tokenizer.pad_token_id)
    batches = speech.calibration_batches(dataset, collator, 2, 2)
    assert all("decoder_input_ids" in batch and "attention_mask" not in batch for batch in batches)
    calibration = conversion.calibrate_ffn(model, batches, originals)
    assert [layer.activation for layer in calibration.layers] == FFN_ACTIVATIONS  # encoder first, then decoder
    assert all(layer.error_after < layer.error_before for layer in calibration.layers)

    eval_clips = [speech.Clip(str(RECORDINGS / f"{d}_george_0.wav")) for d in (5, 8)]
    waveforms = [speech.load_waveform(clip) for clip in eval_clips]
    patched = pipeline(
        "automatic-speech-recognition", model=model, tokenizer=tokenizer, feature_extractor=feature_extractor
    )
    expected = [patched(w, generate_kwargs={"max_new_tokens": 8})["text"] for w in waveforms]

    export = tmp_path / "whisper_relu"
    export_for_inference(model)
    model.save_pretrained(export)
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(export)
    config = json.loads((export / "config.json").read_text())
    assert (config["activation_function"], config["max_source_positions"]) == ("relu", 50)

    padded = np.zeros((len(waveforms), max(len(w) for w in waveforms)), dtype=np.float32)
    lengths = [len(w) for w in waveforms]
    for row, w in enumerate(waveforms):
        padded[row, : len(w)] = w
    np.save(tmp_path / "waveforms.npy", padded)
    env_script = STOCK_PIPELINE.replace(
        "np.load(sys.argv[2])", f"[w[:n] for w, n in zip(np.load(sys.argv[2]), {lengths})]"
    )
    done = subprocess.run(
        [sys.executable, "-c", env_script, str(export), str(tmp_path / "waveforms.npy")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stock = json.loads(done.stdout.strip().splitlines()[-1])
    assert stock == expected
    assert any(text.strip() for text in expected)
    assert model.model.encoder.embed_positions.weight.shape == torch.Size([50, 384])
