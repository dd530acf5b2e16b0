"""Causal-LM pieces of recipes/run_clm.py: the model source (a folder, hub id or GGUF, read by hf_helu's own
loader), the text and its token blocks, and perplexity: ``exp(sum of token NLLs / predicted tokens)`` over contiguous
``block_size`` blocks (the remainder shorter than a block dropped), gathered over processes so every block counts once.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_helu.cli.common import (
    gguf_file,
    load_checkpoint,
    load_config,
    load_tokenizer,
    resolve_source,
    source_model_class,
)
from hf_helu.errors import UsageError
from recipe_support.paths import DATA_DIR_ENV, data_path, read_utf8


def model_source(name: str) -> tuple[Path, dict[str, Any]]:
    """``--model_name_or_path`` resolved and its config read; a config that is unreadable or not a causal LM's is a
    UsageError, before any weight is loaded. Returns what the loader takes and results.json's record of it."""
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
    return path, {"source": str(gguf[0] if gguf else path), "gguf_file": gguf[1] if gguf else None}


def load_causal_lm(path: Path) -> tuple[nn.Module, Any]:
    """The float32 causal LM and its tokenizer (a GGUF checkpoint dequantized)."""
    return load_checkpoint(path).float(), load_tokenizer(path)


def text_source(args: Any) -> dict[str, Any]:
    """``--dataset_name``, ``--train_file/--validation_file`` or ``--data_dir`` (default $HF_HELU_DATA_DIR/wikitext-2,
    train.txt/valid.txt), files checked to exist before anything is loaded."""
    files = args.train_file or args.validation_file
    if sum(bool(x) for x in (args.dataset_name, files, args.data_dir)) > 1:
        raise UsageError("give one of --dataset_name, --train_file/--validation_file or --data_dir, not several")
    with_train = not args.eval_only or "calibrate" in args.conversion  # training, or calibrating, reads the train text
    if args.dataset_name:
        return {"dataset": args.dataset_name, "config": args.dataset_config_name, "column": args.text_column} | {
            "with_train": with_train
        }
    root = None if files else args.data_dir or data_path("wikitext-2")
    if not files and root is None:
        raise UsageError(
            f"no data: give --data_dir, --train_file/--validation_file or --dataset_name (or set {DATA_DIR_ENV})"
        )
    train, validation = (args.train_file, args.validation_file) if files else (root / "train.txt", root / "valid.txt")
    needed = {"validation": ("--validation_file", validation)} | (
        {"train": ("--train_file", train)} if with_train else {}
    )
    for flag, path in needed.values():
        if path is None or not Path(path).is_file():
            raise UsageError(f"{flag}: {path} is not a text file" if path else f"{flag} is needed")
    return {name: Path(path) for name, (_, path) in needed.items()}


def read_texts(source: dict[str, Any]) -> dict[str, str]:
    """``{"validation": ...}`` and, where the run needs it, ``"train"``, each as one string."""
    if "dataset" not in source:
        return {name: read_utf8(path) for name, path in source.items()}
    import datasets

    loaded = datasets.load_dataset(source["dataset"], source["config"])
    texts = {}
    splits = {"validation": "validation" if "validation" in loaded else "test"} | (
        {"train": "train"} if source["with_train"] else {}
    )
    for name, split in splits.items():
        if split not in loaded or source["column"] not in loaded[split].column_names:
            raise UsageError(
                f"--dataset_name {source['dataset']}: no {split!r} split with a {source['column']!r} column"
            )
        texts[name] = "".join(row if row.endswith("\n") else row + "\n" for row in loaded[split][source["column"]])
    return texts


def token_blocks(tokenizer: Any, text: str, block_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """The text's first ``max_tokens`` tokens (no special tokens added) as ``(blocks, block_size)``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return torch.tensor(ids[: len(ids) // block_size * block_size], dtype=torch.long).view(-1, block_size)


def causal_batch(blocks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loaders' collate_fn: blocks as a causal-LM batch (``labels`` = ``input_ids``; the model shifts them)."""
    ids = torch.stack(blocks)
    return {"input_ids": ids, "labels": ids}


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, dataloader: Any, monitor: bool = True) -> dict[str, Any]:
    """Perplexity of ``model`` over the blocks of ``dataloader`` and, with ``monitor``, the FFN dead/zero-unit
    statistics of :class:`hf_helu.ActivationMonitor` (summed over processes)."""
    from hf_helu import ActivationMonitor

    model.eval()
    sums, counts = [], []
    watcher = ActivationMonitor(accelerator.unwrap_model(model)) if monitor else None
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
