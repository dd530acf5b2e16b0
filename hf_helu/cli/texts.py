"""Texts to run a text model on: a GLUE task folder or TSV file (via the GLUE task table), or a plain text file.

The GLUE table lives with the recipe support (:mod:`hf_helu.training.glue`); it is imported only when a GLUE
folder or TSV is read, so the other commands never load recipe code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


def _glue_task_of(folder: Path):
    """The GLUE task whose folder name (``STS-B``) or task name (``stsb``) ``folder`` carries."""
    from hf_helu.training import glue

    for task in glue.GLUE_TASKS.values():
        if folder.name.lower() in (task.folder.lower(), task.name):
            return task
    raise ValueError(
        f"cannot tell which columns of {folder} hold text: its folder name is no GLUE task folder "
        f"(expected one of {', '.join(t.folder for t in glue.GLUE_TASKS.values())})"
    )


def _read_glue_texts(path: Path) -> list[tuple[str, str | None]]:
    """The text columns of a GLUE task folder (its dev set) or of one of its TSV files."""
    from hf_helu.training import glue

    task = _glue_task_of(path if path.is_dir() else path.parent)
    if path.is_dir():
        candidates = [path / name for name in task.eval_files().values()]
        path = next((c for c in candidates if c.is_file()), candidates[0])
        if not path.is_file():
            raise FileNotFoundError(f"no data file at {path}")
    columns = glue.read_tsv(task, path)
    first = columns[task.text_columns[0]]
    second = columns[task.text_columns[1]] if len(task.text_columns) > 1 else [None] * len(first)
    return list(zip(first, second, strict=True))


def read_texts(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """Texts (single or pairs) of a GLUE task folder (its dev set) or TSV file, or of a plain text file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data file at {path}")
    if path.is_dir() or path.suffix.lower() == ".tsv":
        return _read_glue_texts(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise ValueError(f"{path}: not UTF-8 text (byte {byte:#04x} at offset {error.start})") from None
    texts = [(line.strip(), None) for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"{path} has no non-empty lines")
    return texts


def iter_text_batches(
    tokenizer: Any, texts: Sequence[tuple[str, str | None]], batch_size: int, max_length: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches (padded to the longest in the batch, truncated to ``max_length``)."""
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        first = [a for a, _ in chunk]
        second = [b for _, b in chunk] if chunk[0][1] is not None else None
        yield tokenizer(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
