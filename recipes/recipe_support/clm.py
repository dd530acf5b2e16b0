"""Causal-LM pieces of recipes/run_clm.py: the model source (folder, hub id or GGUF), the text, its token blocks and
perplexity.

Perplexity is ``exp(sum of token NLLs / predicted tokens)`` over contiguous ``block_size`` blocks of the validation
text (each block predicts its tokens 2..block_size; the remainder shorter than a block is dropped), summed over
processes with ``accelerator.gather_for_metrics`` so every block counts once.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_helu.cli.common import (  # hf_helu's own loader (folders, hub ids, GGUF files): imported here only
    gguf_file,
    load_checkpoint,
    load_config,
    load_tokenizer,
    resolve_source,
    source_model_class,
)
from hf_helu.errors import UsageError
from recipe_support.paths import DATA_DIR_ENV, data_path

WIKITEXT = "wikitext-2"


# ----------------------------------------------------------------------------------------------------------------
# The model source
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where ``--model_name_or_path`` points: a local folder (``location``) and, for a GGUF checkpoint, the file."""

    location: str
    gguf_file: str | None = None
    path: Path | None = None  # what hf_helu's loader takes: the folder, or the .gguf file


def model_source(name: str) -> ModelSource:
    """``--model_name_or_path`` resolved (a folder, a ``.gguf`` file or a folder with one, a hub snapshot) and its
    config read, by hf_helu's own loader; a config that is unreadable, or whose class is not a causal LM (a BERT
    classifier), is a UsageError, before any weight is loaded."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        path = resolve_source(name)
        cls = source_model_class(path, load_config(path))
    except UsageError as error:
        raise UsageError(f"--model_name_or_path {name}: {error}") from None
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    if cls.__name__ not in causal and cls is not AutoModelForCausalLM:  # the latter: a GGUF file's own config
        raise UsageError(
            f"--model_name_or_path {name} holds a {cls.__name__} (config.architectures), not a causal language model; "
            "run_clm trains a *ForCausalLM checkpoint"
        )
    gguf = gguf_file(path)
    return ModelSource(str(gguf[0] if gguf else path), gguf[1] if gguf else None, path)


def load_causal_lm(source: ModelSource) -> tuple[nn.Module, Any]:
    """The float32 causal LM and its tokenizer (hf_helu's loader: a GGUF checkpoint dequantized, saveable)."""
    return load_checkpoint(source.path).float(), load_tokenizer(source.path)


# ----------------------------------------------------------------------------------------------------------------
# Text and token blocks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource:
    """The run's text: two files (``train``/``validation``; ``train`` None for --eval_only) or a hub dataset."""

    train: Path | None = None
    validation: Path | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    text_column: str = "text"


def text_source(args: Any) -> TextSource:
    """``--dataset_name``, ``--train_file/--validation_file`` or ``--data_dir`` (default $HF_HELU_DATA_DIR/wikitext-2,
    with train.txt/valid.txt), checked to exist before anything is loaded."""
    files = args.train_file or args.validation_file
    if sum(bool(x) for x in (args.dataset_name, files, args.data_dir)) > 1:
        raise UsageError("give one of --dataset_name, --train_file/--validation_file or --data_dir, not several")
    if args.dataset_name:
        return TextSource(
            dataset=args.dataset_name, dataset_config=args.dataset_config_name, text_column=args.text_column
        )
    if files:
        train, validation = args.train_file, args.validation_file
    else:
        root = args.data_dir or data_path(WIKITEXT)
        if root is None:
            raise UsageError(
                f"no data: give --data_dir, --train_file/--validation_file or --dataset_name (or set {DATA_DIR_ENV})"
            )
        train, validation = Path(root) / "train.txt", Path(root) / "valid.txt"
    needs_train = needs_training_text(args)
    needed = {"--validation_file": validation} | ({"--train_file": train} if needs_train else {})
    for flag, path in needed.items():
        if path is None or not Path(path).is_file():
            raise UsageError(f"{flag}: {path} is not a text file" if path else f"{flag} is needed")
    return TextSource(train=Path(train) if needs_train else None, validation=Path(validation))


def needs_training_text(args: Any) -> bool:
    """Training, or calibrating a conversion (also for --eval_only), reads the training text."""
    return not args.eval_only or "calibrate" in args.conversion


def read_texts(source: TextSource, with_train: bool) -> dict[str, str]:
    """``{"validation": ...}`` and, ``with_train``, ``"train"``, each as a single string."""
    if source.dataset is None:
        files = {"validation": source.validation} | ({"train": source.train} if with_train else {})
        return {name: _read_utf8(path) for name, path in files.items()}
    import datasets

    loaded = datasets.load_dataset(source.dataset, source.dataset_config)
    splits = {"validation": "validation" if "validation" in loaded else "test"}
    if with_train:
        splits["train"] = "train"
    texts = {}
    for name, split in splits.items():
        if split not in loaded or source.text_column not in loaded[split].column_names:
            raise UsageError(
                f"--dataset_name {source.dataset}: no {split!r} split with a {source.text_column!r} column"
            )
        rows = loaded[split][source.text_column]
        texts[name] = "".join(row if row.endswith("\n") else row + "\n" for row in rows)
    return texts


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def token_blocks(tokenizer: Any, text: str, block_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """The text's tokens (no special tokens added), the first ``max_tokens`` of them, as ``(blocks, block_size)``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    blocks = len(ids) // block_size
    return torch.tensor(ids[: blocks * block_size], dtype=torch.long).view(blocks, block_size)


class BlockDataset(torch.utils.data.Dataset):
    """Token blocks as causal-LM examples (``labels`` = ``input_ids``; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


# ----------------------------------------------------------------------------------------------------------------
# Perplexity and FFN statistics
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, dataloader: Any, monitor: bool = True) -> dict[str, Any]:
    """Perplexity of ``model`` over the blocks of ``dataloader`` (see the module doc) and, with ``monitor``, the
    FFN dead/zero-unit statistics of :class:`hf_helu.ActivationMonitor` (summed over processes)."""
    from hf_helu import ActivationMonitor

    model.eval()
    sums, counts = [], []
    inner = accelerator.unwrap_model(model)
    watcher = ActivationMonitor(inner) if monitor else None
    with watcher if watcher is not None else contextlib.nullcontext():
        for batch in dataloader:
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            block_sums, block_counts = accelerator.gather_for_metrics(
                (nll.sum(1).double(), torch.full_like(nll[:, 0], nll.shape[1]).double())
            )
            sums.append(block_sums.cpu())
            counts.append(block_counts.cpu())
    tokens = float(torch.cat(counts).sum())
    loss = float(torch.cat(sums).sum()) / tokens
    result: dict[str, Any] = {"perplexity": math.exp(loss), "loss": loss, "tokens": int(tokens)}
    if watcher is not None:
        result["ffn"] = watcher.stats(accelerator).to_dict()
    return result


__all__ = [
    "BlockDataset",
    "ModelSource",
    "TextSource",
    "evaluate",
    "load_causal_lm",
    "model_source",
    "needs_training_text",
    "read_texts",
    "text_source",
    "token_blocks",
]
