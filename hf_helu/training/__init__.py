"""Recipe support: the code the scripts in ``recipes/`` share, and the only part of hf_helu that imports
accelerate, datasets, peft, scipy and soundfile (each inside the module that needs it).

- :mod:`~hf_helu.training.args`: the shared flags (``add_training_args``, ``add_conversion_args``) and the settings
  they become (``FitConfig``, ``LoraSettings``).
- :mod:`~hf_helu.training.models`: one float32 model loader, the trained-head check, ``prepare_model`` (activation,
  LoRA).
- :mod:`~hf_helu.training.loop`: ``make_accelerator``, ``fit`` (train, evaluate, checkpoint, resume, save) and its
  ``FitHooks``; :mod:`~hf_helu.training.evaluation`, :mod:`~hf_helu.training.checkpoints`,
  :mod:`~hf_helu.training.results`: the parts ``fit`` is built from.
- :mod:`~hf_helu.training.glue`: GLUE tasks, TSVs, metrics; :mod:`~hf_helu.training.speech`: audio data, CTC text,
  WER/CER, Wav2Vec2 models.
- :mod:`~hf_helu.training.paths`: the one data root (``$HF_HELU_DATA_DIR``).

Importing this package loads nothing (``hf_helu.cli`` reads GLUE's task table from it). The public names of the
modules above up to ``paths`` (their ``__all__``) are also attributes of the package, imported on first use, so
``from hf_helu.training import fit`` works.
"""

from __future__ import annotations

import importlib
from typing import Any

# Searched in this order for a name asked of the package (glue and speech are reached as submodules).
_MODULES = ("args", "models", "loop", "evaluation", "checkpoints", "results", "paths", "output_dir", "errors")


def __getattr__(name: str) -> Any:
    if not name.startswith("_"):
        for module_name in _MODULES:
            module = importlib.import_module(f"{__name__}.{module_name}")
            if name in module.__all__:
                return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES, "glue", "speech"})
