"""Texts to run a text model on: the text columns of a GLUE task folder or TSV file, or the lines of a text file.

Only the text columns are read (labels are not needed to watch activations or calibrate), so the few lines below
are all of GLUE the CLI knows: which columns hold text in each task's TSVs, and which file is its dev set.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_helu.errors import UsageError

# GLUE folder -> the header names of its text columns (CoLA has no header: its sentence is column 3).
GLUE_TEXT_COLUMNS: dict[str, tuple[str, ...] | tuple[int, ...]] = {
    "CoLA": (3,),
    "SST-2": ("sentence",),
    "MRPC": ("#1 String", "#2 String"),
    "STS-B": ("sentence1", "sentence2"),
    "QQP": ("question1", "question2"),
    "MNLI": ("sentence1", "sentence2"),
    "QNLI": ("question", "sentence"),
    "RTE": ("sentence1", "sentence2"),
    "WNLI": ("sentence1", "sentence2"),
}
DEV_FILES = {"MNLI": "dev_matched.tsv"}  # the others: dev.tsv


def _glue_folder_of(folder: Path) -> str:
    """The GLUE folder name (``STS-B``) that ``folder`` carries, as written or as a task name (``stsb``)."""
    for name in GLUE_TEXT_COLUMNS:
        if folder.name.lower() in (name.lower(), name.lower().replace("-", "")):
            return name
    raise UsageError(
        f"cannot tell which columns of {folder} hold text: its folder name is no GLUE task folder "
        f"(expected one of {', '.join(GLUE_TEXT_COLUMNS)})"
    )


def _read_glue_texts(path: Path) -> list[tuple[str, str | None]]:
    """The text columns of a GLUE task folder (its dev set) or of one of its TSV files."""
    task = _glue_folder_of(path if path.is_dir() else path.parent)
    if path.is_dir():
        path = path / DEV_FILES.get(task, "dev.tsv")
        if not path.is_file():
            raise UsageError(f"no data file at {path}")
    columns = GLUE_TEXT_COLUMNS[task]
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))  # quoting off: GLUE has unbalanced quotes
    first_row = 1
    if isinstance(columns[0], str):
        header = rows[0] if rows else []
        missing = [c for c in columns if c not in header]
        if missing:
            raise UsageError(f"{path}:1: header {header} lacks the text column(s) {missing} of GLUE {task}")
        columns, rows, first_row = tuple(header.index(c) for c in columns), rows[1:], 2
    texts = []
    for number, row in enumerate(rows, first_row):
        if len(row) <= max(columns):
            raise UsageError(f"{path}:{number}: malformed row, expected at least {max(columns) + 1} columns")
        texts.append((row[columns[0]], row[columns[1]] if len(columns) > 1 else None))
    return texts


def read_texts(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """Texts (single or pairs) of a GLUE task folder (its dev set) or TSV file, or of a plain text file."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"no data file at {path}")
    try:
        if path.is_dir() or path.suffix.lower() == ".tsv":
            texts = _read_glue_texts(path)
        else:
            texts = [(line.strip(), None) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        byte = error.object[error.start]
        raise UsageError(f"{path}: not UTF-8 text (byte {byte:#04x} at offset {error.start})") from None
    if not texts:
        raise UsageError(f"{path} has no non-empty lines")
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
