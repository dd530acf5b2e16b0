"""Whisper in recipe_support.speech: the shorter encoder window, the collator's decoder inputs, the asr metrics of
whisper_setup (Whisper's English normaliser); and the Wav2Vec2 minimum clip length (min_input_samples)."""

from __future__ import annotations

import argparse

import jiwer
import numpy as np
import pytest
import torch
from helpers import WHISPER_DIR
from recipe_support import speech


def tiny_whisper_config(**overrides):
    from transformers import WhisperConfig

    fields = dict(
        vocab_size=60, num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=100,
        max_target_positions=16, pad_token_id=1, bos_token_id=2, eos_token_id=1, decoder_start_token_id=2,
    )  # fmt: skip
    fields.update(overrides)
    return WhisperConfig(**fields)


def test_shortened_encoder_is_the_first_positions_and_reloads_with_stock_transformers(tmp_path):
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_whisper_config()).eval()
    full = model.model.encoder.embed_positions.weight.detach().clone()
    assert speech.shorten_encoder(model, 1) == 50
    assert torch.equal(model.model.encoder.embed_positions.weight, full[:50])
    assert model.config.max_source_positions == 50 and not model.model.encoder.embed_positions.weight.requires_grad
    features = torch.randn(2, 80, 100)  # 50 positions x 2 mel frames each
    decoder = torch.tensor([[2, 5, 7], [2, 9, 3]])
    logits = model(input_features=features, decoder_input_ids=decoder).logits
    model.save_pretrained(tmp_path)
    again = WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(again(input_features=features, decoder_input_ids=decoder).logits, logits)


@pytest.mark.parametrize("seconds", [0.5, 3, 0, float("nan")])
def test_bad_encoder_window_is_refused(seconds):
    from transformers import WhisperForConditionalGeneration

    with pytest.raises(ValueError, match=rf"--encoder_seconds {seconds}: expected whole seconds from 1 to 2$"):
        speech.shorten_encoder(WhisperForConditionalGeneration(tiny_whisper_config()), seconds)


def test_collator_decoder_inputs_are_the_labels_shifted_as_stock_whisper_shifts_them():
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(tiny_whisper_config(max_source_positions=50)).eval()
    collator = speech.SpeechCollator(WhisperFeatureExtractor(chunk_length=1), decoder_pad_id=1)
    rng = np.random.default_rng(0)
    rows = [{"input_values": rng.standard_normal(n).astype(np.float32), "labels": ids}
            for n, ids in ((4000, [2, 5, 6, 1]), (9000, [2, 7, 1]))]  # fmt: skip
    batch = collator(rows)
    assert batch["input_features"].shape == (2, 80, 100)
    assert batch["labels"].tolist() == [[5, 6, 1], [7, 1, -100]]
    # Stock Whisper builds its decoder inputs from the labels alone (shift right, start token): same loss.
    stock = model(input_features=batch["input_features"], labels=batch["labels"]).loss
    ours = model(**batch).loss
    torch.testing.assert_close(ours, stock, rtol=0, atol=0)


@pytest.mark.skipif(not (WHISPER_DIR / "tokenizer.json").is_file(), reason=f"no Whisper at {WHISPER_DIR}")
def test_whisper_asr_metrics_normalise_then_match_jiwer():
    args = argparse.Namespace(
        task="asr", model_name_or_path=str(WHISPER_DIR), encoder_seconds=1, max_seconds=16.0, generation_max_tokens=4
    )
    setup = speech.whisper_setup(args, tiny_whisper_config(max_source_positions=1500), [])
    assert setup.collator.feature_extractor.nb_max_frames == 100 and setup.max_seconds == 1
    references = ["seven", "one two", "nine"]
    hypotheses = [" Seven.", "1 to", "Nein!"]
    metrics = setup.compute_metrics({"references": references, "hypotheses": hypotheses, "loss": [1.0, 2.0, 3.0]})
    normalized = ["7", "one to", "nein"]  # Whisper's English normaliser writes numbers as digits
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["wer"] == pytest.approx(jiwer.wer(["7", "12", "9"], normalized))
    assert metrics["cer"] == pytest.approx(jiwer.cer(["7", "12", "9"], normalized))
    assert metrics["loss"] == pytest.approx(2.0)


def test_min_input_samples_is_where_the_conv_stack_gives_its_first_frame():
    from transformers import Wav2Vec2Model

    config = speech.scratch_config("tiny")
    model = Wav2Vec2Model(config).eval()
    needed = speech.min_input_samples(config)
    frames = model._get_feat_extract_output_lengths(torch.tensor([needed - 1, needed]))
    assert frames.tolist() == [0, 1]
    with torch.no_grad():
        assert model(torch.zeros(1, needed)).last_hidden_state.shape[1] == 1
