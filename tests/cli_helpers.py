"""Checkpoints and checks shared by the ``test_cli_*`` modules (imported as ``cli_helpers``)."""

from __future__ import annotations

from pathlib import Path

import transformers
from helpers import tiny_bert

from hf_helu import HeLU, patch_model

transformers.logging.set_verbosity_error()


def save_bert_checkpoint(folder: Path) -> Path:
    """A tiny BERT checkpoint with a tokenizer file and a sentence-transformers style subfolder, saved to ``folder``."""
    model = tiny_bert(0, transformers.BertForMaskedLM, intermediate_size=37, vocab_size=99, max_position_embeddings=512)
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def save_partial_patch(src: Path, folder: Path) -> Path:
    """The checkpoint in ``src`` with only layer 0 patched (recorded in ``config.hf_helu``), saved to ``folder``."""
    model = transformers.BertForMaskedLM.from_pretrained(src)
    patch_model(model, scope=[0])
    model.save_pretrained(folder)
    return folder


def leftovers(parent: Path, name: str) -> list[str]:
    """Temp or backup folders ``atomic_directory`` may leave beside ``name`` (not the writers' lock file, which stays,
    empty, like the Hub cache's)."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") and p.name != f".{name}.lock"]


def helu_modules(model) -> dict[str, float]:
    return {name: module.alpha for name, module in model.named_modules() if isinstance(module, HeLU)}
