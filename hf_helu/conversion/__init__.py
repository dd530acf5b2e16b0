"""Converting a pretrained GELU (SiLU, ...) checkpoint to HeLU without losing its quality.

Swapping the FFN activation of a pretrained model for ReLU/HeLU costs little at the swap itself,
but fine-tuning the swapped model from there loses a large part of the score (see the conversion
issue). Two remedies, usable alone or together, both ending in a model that is pure HeLU (stock
ReLU once exported):

* **Calibration** at patch time (:func:`calibrate_ffn`, ``calibrate.py``): refit each FFN output
  projection so that ``W2' relu(z) + b'`` matches ``W2 act(z) + b`` on the tokens of a few hundred
  unlabeled examples (:func:`calibration_batches`, :func:`dataset_batches` in ``batches.py``).
* **Annealing** during fine-tuning (:class:`ActivationAnnealer`, ``anneal.py``): every FFN activation
  becomes ``(1 - l) act(z) + l helu(z)`` with ``l`` rising linearly from 0 to 1 over a fraction of the steps.

:func:`convert_model` (``convert.py``) runs patching plus either or both (``"auto"``, its default, picks the
recommended method: :func:`resolve_conversion` in ``auto.py``, shared with the recipes); :class:`FFNDistiller`
(``distill.py``) adds an optional distillation term (every FFN block's output pulled toward the frozen
original's) to the fine-tuning loss. The FFN sites are :class:`hf_helu.families.ActivationSite` objects
(``sites.py``: :func:`ffn_sites`, :func:`original_activations`).
"""

from hf_helu.conversion.anneal import ANNEAL_MODES, DEFAULT_ANNEAL_FRACTION, ActivationAnnealer
from hf_helu.conversion.auto import (
    AUTO,
    CONVERSION_CHOICES,
    CONVERSION_METHODS,
    RECOMMENDED_METHOD,
    ConversionChoice,
    check_conversion_method,
    relu_like_ffn,
    resolve_conversion,
)
from hf_helu.conversion.batches import calibration_batches, dataset_batches
from hf_helu.conversion.calibrate import (
    DEFAULT_RIDGE,
    CalibrationReport,
    LayerCalibration,
    calibrate_ffn,
    check_ridge,
)
from hf_helu.conversion.convert import ConversionResult, apply_conversion, convert_model, patch_activation
from hf_helu.conversion.distill import FFNDistiller
from hf_helu.conversion.quality import ffn_output_errors
from hf_helu.conversion.sites import ActivationSpec, ffn_sites, original_activations

__all__ = [
    "ANNEAL_MODES",
    "AUTO",
    "CONVERSION_CHOICES",
    "CONVERSION_METHODS",
    "DEFAULT_ANNEAL_FRACTION",
    "DEFAULT_RIDGE",
    "RECOMMENDED_METHOD",
    "ActivationAnnealer",
    "ActivationSpec",
    "AnnealingCallback",
    "CalibrationReport",
    "ConversionChoice",
    "ConversionResult",
    "FFNDistiller",
    "LayerCalibration",
    "apply_conversion",
    "calibrate_ffn",
    "calibration_batches",
    "check_conversion_method",
    "check_ridge",
    "convert_model",
    "dataset_batches",
    "ffn_output_errors",
    "ffn_sites",
    "original_activations",
    "patch_activation",
    "relu_like_ffn",
    "resolve_conversion",
]


def __getattr__(name: str):
    if name == "AnnealingCallback":  # built on first use: TrainerCallback pulls in the Trainer's dependencies
        from hf_helu.conversion.anneal import AnnealingCallback

        return AnnealingCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
