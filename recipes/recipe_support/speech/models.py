"""Wav2Vec2 models for the speech recipe: small scratch configs that train on a CPU, and the classification or CTC
model of a task, loaded through :func:`recipe_support.models.load_model`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hf_helu.errors import UsageError
from recipe_support.models import Head, check_head, load_model
from recipe_support.speech.audio import SAMPLING_RATE
from recipe_support.speech.text import PAD_TOKEN

TASKS = ("classify", "asr")

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


def scratch_config(size: str = "small", overrides: str | None = None):
    """A ``Wav2Vec2Config`` of a named size (``tiny``, ``small``, ``base``) with ``overrides`` applied by
    ``PretrainedConfig.update_from_string`` (``"hidden_size=64,num_hidden_layers=2"``: int, float, bool and string
    fields)."""
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


def label_fields(labels: Sequence[str] | None) -> dict[str, Any]:
    """The config fields of a classification head for ``labels``: their number, names and ids."""
    if not labels:
        raise UsageError("classification needs the label names")
    return {
        "num_labels": len(labels),
        "label2id": {n: i for i, n in enumerate(labels)},
        "id2label": dict(enumerate(labels)),
    }


def _head_fields(task: str, labels: Sequence[str] | None, vocabulary: Mapping[str, int] | None) -> dict[str, Any]:
    """The config fields of the task's head: label names and ids (classify) or the CTC vocabulary size (asr)."""
    if task == "classify":
        return label_fields(labels)
    if not vocabulary or PAD_TOKEN not in vocabulary:
        raise ValueError(f"speech recognition needs a vocabulary with {PAD_TOKEN!r} (the CTC blank)")
    return {"vocab_size": len(vocabulary), "pad_token_id": vocabulary[PAD_TOKEN]}


def task_head(task: str, fields: Mapping[str, Any]) -> Head:
    """What ``task`` needs of a checkpoint's trained head (for :func:`recipe_support.models.check_head`)."""
    if task == "classify":
        labels = tuple(fields["id2label"][i] for i in range(fields["num_labels"]))
        return Head("classification", len(labels), "the dataset", labels=labels, detail=", ".join(labels))
    return Head("ctc", fields["vocab_size"], "the vocabulary", detail="characters and special tokens")


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

    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: expected one of {list(TASKS)}")
    if (model_name_or_path is None) == (config is None):
        raise ValueError("pass exactly one of model_name_or_path (a checkpoint) and config (a new model)")
    fields = _head_fields(task, labels, vocabulary)
    auto = AutoModelForAudioClassification if task == "classify" else AutoModelForCTC
    if config is not None:
        return load_model(auto, config, **fields)
    check_head(AutoConfig.from_pretrained(model_name_or_path), task_head(task, fields), model_name_or_path)
    return load_model(auto, model_name_or_path, init, **fields)
