"""Batches for the speech recipe: decoded clips in memory, and the collator that pads them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


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
