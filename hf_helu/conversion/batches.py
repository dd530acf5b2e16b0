"""Batches of unlabeled model inputs for calibration, and their padding masks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hf_helu.capture import token_mask

LABEL_KEYS = ("labels", "label")
MASK_KEYS = ("attention_mask", "decoder_attention_mask")


def model_inputs(batch: Mapping[str, Any], device: torch.device | None = None) -> dict[str, Any]:
    """``batch`` without its labels, tensors moved to ``device`` (when given)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batches must be mappings of model inputs (dicts of tensors), got {type(batch).__name__}")
    return {
        key: value.to(device) if device is not None and isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
        if key not in LABEL_KEYS
    }


def padding_mask(batch: Mapping[str, Any], hidden: torch.Tensor) -> torch.Tensor | None:
    """Bool mask of the real (non-padding) positions of ``hidden`` (batch, seq, features), or None without a mask.

    The first of the batch's ``attention_mask`` / ``decoder_attention_mask`` that matches ``hidden``'s positions;
    a ValueError when the batch has masks and none matches (conversion cannot tell padding from tokens then).
    """
    masks = [batch[key] for key in MASK_KEYS if batch.get(key) is not None]
    if not masks:
        return None
    if hidden.dim() == 3:
        for mask in masks:
            matched = token_mask(mask, hidden.shape[:-1], hidden.device)
            if matched is not None:
                return matched
    raise ValueError(
        f"cannot match the attention mask(s) of shape {[tuple(m.shape) for m in masks]} to FFN activations of "
        f"shape {tuple(hidden.shape)}; pass calibration batches without padding and without an attention mask"
    )


def calibration_batches(
    tokenizer,
    texts: Sequence[str] | Sequence[tuple[str, str]],
    batch_size: int = 32,
    max_length: int = 128,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize sentences (or sentence pairs) into padded batches for :func:`calibrate_ffn`.

    Examples are grouped by length (less padding, a faster fit); padding is masked out anyway.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("calibration needs at least one text, got none")
    pairs = not isinstance(texts[0], str)
    if pairs and not all(isinstance(t, tuple | list) and len(t) == 2 for t in texts):
        raise ValueError("calibration texts must be all strings or all (sentence1, sentence2) pairs")
    columns = list(zip(*texts, strict=True)) if pairs else [texts]
    encoded = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [{key: values[i] for key, values in encoded.items()} for i in order[start : start + batch_size]]
        batches.append(dict(tokenizer.pad(rows, return_tensors="pt")))
    return batches


def dataset_batches(
    dataset,
    collate_fn: Callable[[list[dict[str, Any]]], Mapping[str, Any]],
    samples: int,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """The first ``samples`` rows of a tokenized ``datasets.Dataset``, unlabeled, collated into batches.

    Rows are grouped by length (less padding); label columns are dropped.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"calibration samples must be an integer >= 1, got {samples!r}")
    subset = dataset.select(range(min(samples, len(dataset))))
    subset = subset.remove_columns([c for c in LABEL_KEYS if c in subset.column_names])
    rows = sorted((dict(row) for row in subset), key=lambda row: len(row["input_ids"]))
    return [dict(collate_fn(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
