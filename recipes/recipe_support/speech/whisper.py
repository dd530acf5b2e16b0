"""Whisper in the speech recipe: the model of a task (``WhisperForConditionalGeneration`` for asr,
``WhisperForAudioClassification`` for classify), a shorter encoder window, and the collator.

Whisper pads every clip to a 30 s window (3,000 mel frames, 1,500 encoder positions), so a 0.5 s digit costs as
much as 30 s of speech. :func:`shorten_encoder` keeps only the first N encoder positions (whisper.cpp's "audio
context"): ``config.max_source_positions = N``, the first N rows of ``embed_positions``, and a feature extractor
whose chunk is N / 50 seconds. The saved model and feature extractor load with stock transformers as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hf_helu.errors import UsageError
from recipe_support.models import load_model
from recipe_support.speech.models import label_fields

ENCODER_POSITIONS_PER_SECOND = 50  # 100 mel frames per second, halved by the encoder's second conv (stride 2)
MEL_FRAMES_PER_POSITION = 2


def is_whisper(config: Any) -> bool:
    return getattr(config, "model_type", None) == "whisper"


def encoder_positions(seconds: float, available: int) -> int:
    """Encoder positions of a ``seconds`` window; it must be a whole number of positions, at most ``available``."""
    positions = seconds * ENCODER_POSITIONS_PER_SECOND
    if not (math.isfinite(positions) and positions >= 1 and abs(positions - round(positions)) < 1e-9):
        raise UsageError(f"--encoder_seconds {seconds} is not a whole number of encoder positions (1/50 s each) >= 1")
    if round(positions) > available:
        raise UsageError(
            f"--encoder_seconds {seconds} needs {round(positions)} encoder positions; the checkpoint has {available} "
            f"({available / ENCODER_POSITIONS_PER_SECOND:g} s)"
        )
    return round(positions)


def whisper_encoder(model: nn.Module) -> nn.Module:
    """The ``WhisperEncoder`` of a conditional-generation or audio-classification model."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else getattr(model, "encoder", None)
    if encoder is None or not hasattr(encoder, "embed_positions"):
        raise ValueError(f"{type(model).__name__} has no Whisper encoder")
    return encoder


def freeze_conv_frontend(model: nn.Module) -> None:
    """Freeze the encoder's two conv layers (Whisper's counterpart of Wav2Vec2's feature encoder)."""
    encoder = whisper_encoder(model)
    encoder.conv1.requires_grad_(False)
    encoder.conv2.requires_grad_(False)


def shorten_encoder(model: nn.Module, seconds: float) -> int:
    """Keep the first ``seconds`` x 50 encoder positions of ``model`` (in place); return their number."""
    encoder = whisper_encoder(model)
    old = encoder.embed_positions
    positions = encoder_positions(seconds, old.num_embeddings)
    if positions == old.num_embeddings:
        return positions
    new = nn.Embedding(positions, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight[:positions])
    new.weight.requires_grad_(old.weight.requires_grad)
    encoder.embed_positions = new
    encoder.max_source_positions = positions
    encoder.config.max_source_positions = positions
    model.config.max_source_positions = positions
    return positions


def window_seconds(config: Any) -> float:
    """The encoder window of a Whisper config, in seconds."""
    return config.max_source_positions / ENCODER_POSITIONS_PER_SECOND


def load_feature_extractor(source: str, seconds: float):
    """The checkpoint's ``WhisperFeatureExtractor`` with a ``seconds`` chunk (mel frames to match the encoder);
    whole seconds only, so that the saved extractor loads and pads alike in stock transformers."""
    from transformers import WhisperFeatureExtractor

    if not float(seconds).is_integer() or seconds < 1:
        raise UsageError(
            f"--encoder_seconds {seconds}: the feature extractor's window (chunk_length) must be a whole number of "
            "seconds >= 1 (stock WhisperFeatureExtractor computes its sizes from it)"
        )
    return WhisperFeatureExtractor.from_pretrained(source, chunk_length=int(seconds))


def build_whisper_model(
    task: str, source: str, init: str = "pretrained", labels: Sequence[str] | None = None
) -> nn.Module:
    """A float32 Whisper for ``task``: asr ``WhisperForConditionalGeneration``; classify
    ``WhisperForAudioClassification`` (the checkpoint's encoder and a new head sized for ``labels``)."""
    from transformers import WhisperForAudioClassification, WhisperForConditionalGeneration

    if task == "asr":
        return load_model(WhisperForConditionalGeneration, source, init)
    return load_model(WhisperForAudioClassification, source, init, **label_fields(labels))


def transcript_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of the transcripts as the decoder sees them: ``<|startoftranscript|>`` ... ``<|endoftext|>``."""
    return [tokenizer(text).input_ids for text in texts]


@dataclass
class WhisperCollator:
    """Waveforms -> log-mel ``input_features`` (the feature extractor's window); targets -> labels.

    asr (targets are token ids starting with the decoder start token): ``decoder_input_ids`` = ids[:-1], padded
    with ``pad_token_id``, and ``labels`` = ids[1:], padded with -100. The decoder inputs are passed explicitly,
    so a frozen teacher (distillation) and calibration, which drop the labels, still run the decoder.
    """

    feature_extractor: Any
    pad_token_id: int | None = None
    fixed_size = True  # every clip becomes the same log-mel window: batches of any clips need no padding

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        waveforms = [np.asarray(f["input_values"], dtype=np.float32) for f in features]
        extracted = self.feature_extractor(
            waveforms, sampling_rate=self.feature_extractor.sampling_rate, return_tensors="pt"
        )
        batch = {"input_features": extracted.input_features}
        targets = [f["labels"] for f in features]
        if not isinstance(targets[0], (list, tuple)):
            batch["labels"] = torch.as_tensor(targets, dtype=torch.long)
            return batch
        if self.pad_token_id is None:
            raise ValueError("WhisperCollator needs pad_token_id for token-id targets")
        short = [ids for ids in targets if len(ids) < 2]
        if short:
            raise ValueError(f"transcript token ids {short[0]} are too short (need a start token and an end)")
        rows = [torch.as_tensor(ids, dtype=torch.long) for ids in targets]
        pad = torch.nn.utils.rnn.pad_sequence
        batch["decoder_input_ids"] = pad([r[:-1] for r in rows], batch_first=True, padding_value=self.pad_token_id)
        batch["labels"] = pad([r[1:] for r in rows], batch_first=True, padding_value=-100)
        return batch
