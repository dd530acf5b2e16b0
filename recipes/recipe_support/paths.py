"""Local data for the recipes: one root named by ``$HF_HELU_DATA_DIR``, never a path guessed from the checkout.

Below the root: ``glue/<TASK>/{train,dev}.tsv`` (the classic ``glue_data`` layout), ``fsdd/recordings/*.wav`` (the
Free Spoken Digit Dataset) and ``wikitext-2/{train,valid}.txt``. Without the variable, data comes from the flags
(``--data_dir``, ``--dataset``, text files) or the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "HF_HELU_DATA_DIR"


def data_path(name: str) -> Path | None:
    """``$HF_HELU_DATA_DIR/<name>``, or None when the variable is unset or empty."""
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) / name if root else None
