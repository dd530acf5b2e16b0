"""Where the recipes, their tests and their shell scripts find local data: one root, one environment variable.

``$HF_HELU_DATA_DIR`` when set, else ``shared/data`` beside the repository checkout (``<checkout>/../shared/data``).
Below it: ``glue/<TASK>/{train,dev}.tsv`` (the classic ``glue_data`` layout) and ``fsdd/recordings/*.wav`` (the Free
Spoken Digit Dataset).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "HF_HELU_DATA_DIR"
CHECKOUT = Path(__file__).resolve().parents[2]  # hf_helu/training/paths.py -> the repository checkout


def data_root() -> Path:
    """``$HF_HELU_DATA_DIR``, or ``<checkout>/../shared/data``."""
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) if root else CHECKOUT.parent / "shared" / "data"


def glue_dir() -> Path:
    """The GLUE TSV folder under :func:`data_root`."""
    return data_root() / "glue"


def fsdd_dir() -> Path:
    """The Free Spoken Digit Dataset folder under :func:`data_root`."""
    return data_root() / "fsdd"


__all__ = ["CHECKOUT", "DATA_DIR_ENV", "data_root", "fsdd_dir", "glue_dir"]
