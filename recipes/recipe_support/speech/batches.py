"""Batches for the speech recipe: decoded clips in memory, and the collator that pads them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hf_helu.errors import UsageError


class SpeechDataset(torch.utils.data.Dataset):
    """Preprocessed clips in memory: ``{"input_values": float32 array, "labels": int or list[int]}``.

    Decoding everything up front means a bad file fails before training starts, not mid-epoch.
    """

    def __init__(self, waveforms: Sequence[np.ndarray], targets: Sequence[int | list[int]]):
        if len(waveforms) != len(targets):
            raise ValueError(f"{len(waveforms)} waveforms but {len(targets)} targets")
        if not waveforms:
            raise ValueError("empty speech dataset")
        self.waveforms = list(waveforms)
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.waveforms)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"input_values": self.waveforms[index], "labels": self.targets[index]}


@dataclass
class SpeechCollator:
    """Pads waveforms with ``padding_value`` (after per-clip normalisation) and builds the attention mask.

    Class labels become a ``LongTensor``; token-id labels are padded with -100, which CTC loss ignores.
    Models with ``feat_extract_norm="group"`` (wav2vec2-base) were trained without an attention mask:
    for them ``return_attention_mask`` is False and padding is zeros, as their feature extractor does.
    """

    return_attention_mask: bool = True
    padding_value: float = 0.0
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_values"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        values = torch.full((len(features), width), self.padding_value, dtype=torch.float32)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths, strict=True)):
            values[row, :length] = torch.as_tensor(feature["input_values"], dtype=torch.float32)
            mask[row, :length] = 1
        batch = {"input_values": values}
        if self.return_attention_mask:
            batch["attention_mask"] = mask
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], (list, tuple)):
            longest = max(len(tokens) for tokens in labels)
            padded = torch.full((len(labels), longest), -100, dtype=torch.long)
            for row, tokens in enumerate(labels):
                padded[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            batch["labels"] = padded
        else:
            batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
        return batch


def calibration_batches(
    dataset: SpeechDataset, collator: Any, samples: int, batch_size: int, by_target_length: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Unpadded, unmasked batches of the first ``samples`` clips of ``dataset``, for conversion's calibration.

    A padding mask must match the FFN activations' positions, and a waveform mask does not match an encoder's
    frames; so no batch is padded and none carries a mask. ``by_target_length`` (Whisper asr): batches of clips
    whose token-id targets have one length (the log-mel window is fixed, so only the decoder could need padding).
    Otherwise: ``batch_size`` clips per batch if the collator's inputs have a fixed size (``fixed_size``), else one.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UsageError(f"calibration samples must be an integer >= 1, got {samples!r}")
    count = min(samples, len(dataset))
    if by_target_length:
        by_length: dict[int, list[int]] = {}
        for index in range(count):
            by_length.setdefault(len(dataset.targets[index]), []).append(index)
        groups = [
            ids[i : i + batch_size] for _, ids in sorted(by_length.items()) for i in range(0, len(ids), batch_size)
        ]
    else:
        step = batch_size if getattr(collator, "fixed_size", False) else 1
        groups = [list(range(i, min(i + step, count))) for i in range(0, count, step)]
    batches = []
    for indices in groups:
        batch = dict(collator([dataset[i] for i in indices]))
        batch.pop("attention_mask", None)
        batches.append(batch)
    return batches
