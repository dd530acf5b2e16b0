"""Local data for the recipes: one root named by ``$HF_HELU_DATA_DIR`` (``glue/``, ``fsdd/``, ``wikitext-2/``), never a
path guessed from the checkout, and text files read as UTF-8 with the line of a bad byte named."""

from __future__ import annotations

import os
from pathlib import Path

from hf_helu.errors import UsageError

DATA_DIR_ENV = "HF_HELU_DATA_DIR"


def data_path(name: str) -> Path | None:
    """``$HF_HELU_DATA_DIR/<name>``, or None when the variable is unset or empty."""
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) / name if root else None


def read_utf8(path: Path) -> str:
    """The text of ``path``; a byte that is not UTF-8 is a UsageError naming its line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte {data[error.start]:#04x}: {error.reason})") from None
