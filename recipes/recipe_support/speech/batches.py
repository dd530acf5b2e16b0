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
    """Pads waveforms with the feature extractor's ``pad`` (its padding value, and an attention mask only where the
    extractor returns one: not for ``feat_extract_norm="group"`` checkpoints such as wav2vec2-base). Class labels
    become a ``LongTensor``; token-id labels are padded with -100, which CTC loss ignores."""

    feature_extractor: Any

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        waveforms = [{"input_values": np.asarray(f["input_values"], dtype=np.float32)} for f in features]
        batch = dict(self.feature_extractor.pad(waveforms, padding=True, return_tensors="pt"))
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], (list, tuple)):
            rows = [torch.as_tensor(tokens, dtype=torch.long) for tokens in labels]
            batch["labels"] = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-100)
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
