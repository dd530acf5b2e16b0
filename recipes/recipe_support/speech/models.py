"""Speech models: small scratch Wav2Vec2 configs that train on a CPU, the task's Wav2Vec2-style or Whisper model
(through :func:`recipe_support.models.load_model`), and Whisper's shorter encoder window: Whisper pads every clip to
30 s, so a 0.5 s digit costs as much as 30 s of speech."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from hf_helu.errors import UsageError
from recipe_support.models import Head, check_head, load_model

# Four conv layers of total stride 320 (20 ms frames at 16 kHz, as wav2vec2-base; a first stride of 10 instead of 5
# halves the conv stack's cost, which dominates at these sizes), and SpecAugment masks short enough for short clips.
_SMALL = {
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
    "conv_bias": True,
    "conv_dim": (32, 32, 32, 32),
    "conv_kernel": (20, 8, 4, 4),
    "conv_stride": (10, 4, 4, 2),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "mask_time_length": 2,
    "layerdrop": 0.0,
    "ctc_loss_reduction": "mean",
    "ctc_zero_infinity": True,
}
_WIDTHS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "classifier_proj_size")
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {**_SMALL, **dict(zip(_WIDTHS, (32, 2, 2, 64, 32), strict=True))},
    "small": {**_SMALL, **dict(zip(_WIDTHS, (64, 3, 4, 256, 64), strict=True))},
    "base": {},  # Wav2Vec2Config() defaults: the wav2vec2-base architecture
}


def scratch_config(size: str = "small", overrides: str | None = None):
    """A ``Wav2Vec2Config`` of a named size with ``overrides`` (``"hidden_size=64,num_hidden_layers=2"``) applied by
    ``PretrainedConfig.update_from_string``."""
    from transformers import Wav2Vec2Config

    if size not in SIZES:
        raise UsageError(f"unknown model size {size!r}: expected one of {sorted(SIZES)}")
    config = Wav2Vec2Config(**SIZES[size])
    if overrides:
        try:
            config.update_from_string(overrides)
        except (ValueError, TypeError) as err:
            raise UsageError(f"--config_overrides {overrides!r}: {err}; expected key=value[,key=value...]") from None
    return config


def min_input_samples(config) -> int:
    """The fewest waveform samples for which the conv feature encoder of ``config`` gives one frame."""
    needed = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride, strict=True))):
        needed = (needed - 1) * stride + kernel
    return needed


def build_model(
    task: str,
    *,
    model_name_or_path: str | None = None,
    init: str = "pretrained",
    config=None,
    labels: Sequence[str] | None = None,
    vocabulary: Mapping[str, int] | None = None,
) -> nn.Module:
    """A float32 model for ``task``: a head sized for ``labels`` (classify), Whisper's own decoder (Whisper asr) or a
    CTC head sized for ``vocabulary`` (``<pad>`` its blank); from a checkpoint (a trained head of another size is an
    error), its config with random weights (``init="scratch"``), or new from ``config``."""
    from transformers import AutoConfig, AutoModelForAudioClassification, AutoModelForCTC, AutoModelForSpeechSeq2Seq

    checkpoint = config or AutoConfig.from_pretrained(model_name_or_path)
    if task == "classify":
        auto, fields = AutoModelForAudioClassification, {"id2label": dict(enumerate(labels))}
        fields["label2id"] = {name: i for i, name in enumerate(labels)}
        head = Head("classification", len(labels), "the dataset", labels=tuple(labels), detail=", ".join(labels))
    elif checkpoint.model_type == "whisper":
        auto, fields, head = AutoModelForSpeechSeq2Seq, {}, None
    else:
        auto, fields = AutoModelForCTC, {"vocab_size": len(vocabulary), "pad_token_id": vocabulary["<pad>"]}
        head = Head("ctc", len(vocabulary), "the vocabulary", detail="characters and special tokens")
    if config is not None:
        return load_model(auto, config, **fields)
    if head is not None:
        check_head(checkpoint, head, model_name_or_path)
    return load_model(auto, model_name_or_path, init, **fields)


def encoder_positions(seconds: float, available: int) -> int:
    """Encoder positions (50 per second) of a Whisper window of whole ``seconds`` (its feature extractor's
    ``chunk_length``), at most the checkpoint's ``available``."""
    if not (float(seconds).is_integer() and 1 <= seconds * 50 <= available):
        raise UsageError(
            f"--encoder_seconds {seconds}: the encoder window must be a whole number of seconds from 1 to the "
            f"checkpoint's {available / 50:g}"
        )
    return int(seconds * 50)


def shorten_encoder(model: nn.Module, seconds: float) -> int:
    """Keep the first ``seconds`` x 50 encoder positions of a Whisper ``model`` in place (whisper.cpp's "audio
    context"); the saved model, with a feature extractor of that ``chunk_length``, runs in stock transformers."""
    encoder = model.get_encoder()
    old = encoder.embed_positions.weight
    positions = encoder_positions(seconds, len(old))
    encoder.embed_positions = nn.Embedding.from_pretrained(
        old[:positions].detach().clone(), freeze=not old.requires_grad
    )
    encoder.max_source_positions = model.config.max_source_positions = positions
    return positions
