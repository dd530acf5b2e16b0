"""Paths and builders shared by the speech test modules (imported as ``speech_helpers``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import FSDD_DIR

FSDD = FSDD_DIR
RECORDINGS = FSDD / "recordings"
needs_fsdd = pytest.mark.skipif(not RECORDINGS.is_dir(), reason=f"FSDD not found at {RECORDINGS}")


def fsdd_files(names: list[str]) -> list[Path]:
    return [RECORDINGS / name for name in names]


def write_audiofolder(root: Path, layout: dict[str, list[str]]) -> None:
    """``{"train/3": [fsdd names]}``: copies real FSDD recordings into label folders."""
    for folder, names in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(RECORDINGS / name, root / folder / name)


def write_tiny_whisper(folder: Path, whisper_dir: Path, seed: int = 0) -> Path:
    """A random 1+1-layer, 16-wide Whisper with GELU FFNs, saved with the real tiny.en tokenizer, feature extractor
    and generation config (so stock ``generate`` and the pipeline treat it as Whisper tiny.en)."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperProcessor

    real = WhisperConfig.from_pretrained(whisper_dir)
    config = WhisperConfig(
        vocab_size=real.vocab_size,
        num_mel_bins=real.num_mel_bins,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=real.max_source_positions,
        max_target_positions=64,
        activation_function="gelu",
        pad_token_id=real.pad_token_id,
        bos_token_id=real.bos_token_id,
        eos_token_id=real.eos_token_id,
        decoder_start_token_id=real.decoder_start_token_id,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    generation = GenerationConfig.from_pretrained(whisper_dir)
    generation.max_length = 64
    model.generation_config = generation
    model.save_pretrained(folder)
    WhisperProcessor.from_pretrained(whisper_dir).save_pretrained(folder)
    return folder
